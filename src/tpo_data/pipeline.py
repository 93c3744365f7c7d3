"""Build and run the TPO distilabel pipeline for one iteration.

``load >> generate >> split >> judge >> checkpoint`` (no judge with ``--judge none``).
The run keeps a ledger of finished (generated and judged) instructions
(``generations.jsonl``). Each pass runs the distilabel pipeline over the
instructions not yet finished:
- every finished batch is checkpointed by the last step (see ``tpo_data.steps``
  for why distilabel's own cache is not enough after a SIGKILL); a killed run's
  next pass starts after the last finished batch, at the same batch boundaries,
  so content-seeded sampling reproduces an uninterrupted run;
- rows the engine failed on (server down or dead) are not written to the
  ledger; the run stops with a clear error and the next run retries only them.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import logging
import multiprocessing
import os
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tpo_data.engines import EngineArguments, SamplingArguments, api_key, build_llm
from tpo_data.endpoints import split_endpoints
from tpo_data.errors import TPODataError
from tpo_data.files import write_text_atomic
from tpo_data.judges import (
    FORCE_MAX_NEW_TOKENS,
    FORCE_PREFIX,
    JudgeArguments,
    PairwiseJudge,
    judge_engine_args,
    judge_messages,
    judge_sampling,
)
from tpo_data.prompts import ThoughtPrompt
from tpo_data.secrets import register, scrub, secret_values
from tpo_data.training import trained_at

log = logging.getLogger("tpo_data")


@dataclass
class RunArguments:
    """Where a run lives and which iteration it is."""

    output_dir: str = field(default="outputs/tpo", metadata={"help": "Run directory."})
    iteration: int = field(default=1, metadata={"help": "TPO iteration number (1-based)."})
    thought_prompt: str = field(
        default="generic",
        metadata={"help": "generic, specific, system, direct, or a YAML template file."},
    )
    input_batch_size: int = field(
        default=8, metadata={"help": "Instructions per pipeline batch (the unit of resume)."}
    )
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "distilabel cache (default: <output_dir>/.distilabel-cache); use shared "
                  "storage on a Ray cluster."},
    )
    use_ray: bool = field(
        default=False,
        metadata={"help": "Run the pipeline with distilabel's pipeline.ray(): on the cluster named by "
                  "RAY_ADDRESS (e.g. under `ray job submit`), else on a local Ray cluster. Needs "
                  "`pip install 'tpo-data[ray]'`."},
    )
    ray_gpus: int = field(
        default=0,
        metadata={"help": "With --use_ray: GPUs each step that loads a model in its own process asks Ray "
                  "for (the transformers engine, a reward-model or transformers judge); with 0, Ray "
                  "may place them where there is no GPU."},
    )
    store: str | None = field(
        default=None,
        metadata={"help": "Local dataset store the iteration is written to as version iter-N "
                  "(default: <output_dir>/store)."},
    )
    push_to_hub: str | None = field(
        default=None,
        metadata={"help": "Hub dataset repo (namespace/name, e.g. you/tpo-pairs) to publish "
                  "version iter-N to, tagged iter-N, like `tpo-data publish`; created if "
                  "missing. Token from HF_TOKEN or `hf auth login`, checked before generating. "
                  "Rerunning a published iteration pushes nothing."},
    )
    hub_private: bool = field(
        default=False, metadata={"help": "Create the --push_to_hub repo as private if missing."}
    )

    def __post_init__(self) -> None:
        if self.ray_gpus < 0 or (self.ray_gpus and not self.use_ray):
            raise TPODataError(f"--ray_gpus {self.ray_gpus} needs --use_ray and a count of 0 or more.",
                               "Pass --use_ray with --ray_gpus N, or drop --ray_gpus.")

    def iteration_dir(self) -> Path:
        return Path(self.output_dir) / f"iter-{self.iteration}"

    def store_dir(self) -> Path:
        return Path(self.store) if self.store else Path(self.output_dir) / "store"


def check_context(rows: list[dict], prompt: ThoughtPrompt, tokenizer: Any,
                  max_new_tokens: int, context: int) -> None:
    """Refuse, before any generation, instructions that cannot fit the model's context."""
    too_long = [f"{id_} ({n} prompt tokens)"
                for id_, n in _over_context(rows, tokenizer, prompt.messages, max_new_tokens, context)]
    if too_long:
        raise TPODataError(
            f"{len(too_long)} instruction(s) do not fit the model's context of {context} tokens "
            f"with --max_new_tokens {max_new_tokens}: {_first_five(too_long)}",
            "Lower --max_new_tokens or use a model with a longer context. Shortening or removing "
            "those instructions changes the instruction source, which a run with recorded "
            "iterations refuses: then start it in a new --output_dir.",
        )


def _n_tokens(ids: Any) -> int:
    return len(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def _over_context(rows: list[dict], tokenizer: Any, messages: Callable[[str], list[dict[str, str]]],
                  extra: int, context: int) -> list[tuple[str, int]]:
    """(id, prompt tokens) of the rows whose chat prompt ``messages(instruction)`` plus ``extra``
    tokens exceeds ``context``."""
    found = []
    for row in rows:
        n = _n_tokens(tokenizer.apply_chat_template(
            messages(row["instruction"]), tokenize=True, add_generation_prompt=True))
        if n + extra > context:
            found.append((row["id"], n))
    return found


def _first_five(items: list[str]) -> str:
    return ", ".join(items[:5]) + (" ..." if len(items) > 5 else "")


def serving_context(path: str, engine: EngineArguments) -> int | None:
    """The context ``engine`` serves the model at ``path`` with: the model's own, capped by
    --vllm_max_model_len on a vLLM server this run starts; None where the config has none."""
    from transformers import AutoConfig

    context = getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", None)
    if engine.engine == "vllm" and not engine.base_url:
        context = min(context or engine.vllm_max_model_len, engine.vllm_max_model_len)
    return context


def check_judge_context(rows: list[dict], tokenizer: Any, max_new_tokens: int,
                        judge_max_new_tokens: int, context: int) -> None:
    """Refuse, before any generation, instructions whose pair-wise judge prompt may not fit the
    judge's context: two responses of up to max_new_tokens each, the judgment, a forced verdict.
    A request over the context is rejected by the server, and with it the judge's whole batch."""
    extra = 2 * max_new_tokens + judge_max_new_tokens + _n_tokens(
        tokenizer(FORCE_PREFIX, add_special_tokens=False)) + FORCE_MAX_NEW_TOKENS
    too_long = [f"{id_} ({n} + {extra} tokens)" for id_, n in _over_context(
        rows, tokenizer, lambda instruction: judge_messages(instruction, "", ""), extra, context)]
    if too_long:
        raise TPODataError(
            f"{len(too_long)} instruction(s) may not fit the pair-wise judge's context of {context} tokens "
            f"with two responses of up to --max_new_tokens {max_new_tokens} and --judge_max_new_tokens "
            f"{judge_max_new_tokens}: {_first_five(too_long)}",
            "Lower --max_new_tokens or --judge_max_new_tokens, raise --vllm_max_model_len (up to the judge "
            "model's context), or judge with --judge reward_model (it scores a cut pair instead).",
        )


def build_pipeline(name: str, rows: list[dict], prompt: ThoughtPrompt, llm: Any,
                   num_samples: int, input_batch_size: int, cache_dir: Path,
                   checkpoint_dir: Path | None = None, judge: Callable[[], Any] | None = None,
                   generate_gpus: int = 0):
    """``load >> generate >> split [>> judge] [>> checkpoint]``.

    ``judge`` builds the judge step (it must be created inside the pipeline);
    without ``checkpoint_dir`` (benchmarks) nothing is checkpointed. ``generate_gpus``: GPUs
    the generate step asks Ray for (its model runs in the step's process).
    """
    from distilabel.pipeline import Pipeline
    from distilabel.steps import LoadDataFromDicts, StepResources

    from tpo_data.steps import CheckpointRows, SplitThoughts, ThoughtGeneration

    with Pipeline(name=name, cache_dir=cache_dir) as pipeline:
        load = LoadDataFromDicts(name="load", data=rows, batch_size=input_batch_size)
        generate = ThoughtGeneration(
            name="generate", llm=llm, prompt_user=prompt.user, prompt_system=prompt.system,
            num_generations=num_samples, group_generations=True, input_batch_size=input_batch_size,
            resources=StepResources(gpus=generate_gpus or None),
        )
        split = SplitThoughts(
            name="split", separator=prompt.separator, thought_marker=prompt.thought_marker,
            input_batch_size=input_batch_size,
        )
        steps = [load, generate, split]
        if judge:
            steps.append(judge())
        if checkpoint_dir:
            steps.append(CheckpointRows(
                name="checkpoint", checkpoint_dir=str(checkpoint_dir), judged=judge is not None,
                input_batch_size=input_batch_size,
            ))
        for upstream, downstream in zip(steps, steps[1:]):
            upstream >> downstream
    return pipeline


def _judge_factory(judge: JudgeArguments, judge_path: str, engine: EngineArguments,
                   sampling: SamplingArguments, model_path: str, policy: tuple[str | None, str | None],
                   batch_size: int, out_dir: Path, stack: ExitStack, gpus: int = 0) -> Callable[[], Any]:
    """What builds the judge step, after starting the judge's endpoint when it needs its own.
    ``gpus``: what the step asks Ray for when its model runs in the step's process."""
    from distilabel.steps import StepResources

    if judge.judge == "reward_model":
        # Imported here: reward models pull in transformers' Llama, which the spawned
        # step processes of every pipeline would otherwise import too.
        from tpo_data.reward_models import GroupRewardJudge

        return functools.partial(GroupRewardJudge, name="judge", model=judge_path,
                                 input_batch_size=batch_size, batch_size=judge.reward_batch_size,
                                 max_length=judge.reward_max_length, resources=StepResources(gpus=gpus or None))
    args, reuse = judge_engine_args(judge, engine, same_model=judge_path == model_path)
    jsampling = judge_sampling(judge, sampling)
    base_url, served = policy if reuse else start_endpoint(
        args, judge_path, jsampling, out_dir, stack, "vllm-judge-server.log"
    )
    llm = build_llm(args, jsampling, judge_path, base_url, served)
    in_process = gpus if args.engine == "transformers" else 0
    return functools.partial(PairwiseJudge, name="judge", llm=llm, mode=judge.judge_mode,
                             force_verdict=judge.force_verdict, input_batch_size=batch_size,
                             resources=StepResources(gpus=in_process or None))


def _run_pipeline(build: Callable[[], Any], use_ray: bool, yaml_path: Path,
                  log_level: int, secrets: list[str]) -> None:
    """Child-process entry point: build the distilabel pipeline and run it."""
    from tpo_data.cli import setup_logging

    for value in secrets:
        register(value)
    # A spawned interpreter starts without the caller's logging; distilabel's
    # progress should show all the same.
    setup_logging(log_level)
    pipeline = build()
    # Kept for the dataset card. distilabel leaves API keys out; endpoint URLs may carry credentials.
    pipeline.save(yaml_path, format="yaml")
    write_text_atomic(yaml_path, scrub(yaml_path.read_text()))
    if use_ray:
        pipeline = pipeline.ray()
    # Never distilabel's cache: after a SIGKILL it counts the batch in flight as sent, and a run
    # that loaded it waited for that batch forever (argilla-io/distilabel#1065); it also replayed
    # the cached pipeline's LLM settings (endpoints). Our batch checkpoints are the resume point.
    pipeline.run(use_cache=False)


def require_ray() -> None:
    """Fail before any server starts: without Ray the pipeline's child process would die on import."""
    try:
        importlib.import_module("ray")
    except ImportError:
        raise TPODataError(
            "--use_ray is set but Ray is not installed in this environment.",
            "Install it with `pip install 'tpo-data[ray]'` (distilabel's Ray extra), or drop --use_ray.",
        ) from None


def _on_loopback(base_url: str | None) -> bool:
    hosts = [urlsplit(url).hostname or "" for url in split_endpoints(base_url)] if base_url else []
    return any(host in ("localhost", "::1") or host.startswith("127.") for host in hosts)


def _served_on_loopback(args: EngineArguments) -> bool:
    """A vLLM server this run starts (127.0.0.1 only), or endpoints the user gave on loopback."""
    return (args.engine == "vllm" and not args.base_url) or _on_loopback(args.base_url)


def _joins_a_cluster() -> bool:
    """Whether distilabel's ``ray.init()`` connects to a running cluster instead of starting its own:
    RAY_ADDRESS, or the address file `ray start` leaves (Ray's own lookup, a private function)."""
    if os.environ.get("RAY_ADDRESS"):
        return True
    try:
        from ray._private.services import find_bootstrap_address

        return find_bootstrap_address(None) is not None
    except Exception:  # another Ray version: RAY_ADDRESS is the documented way
        return False


def _warn_unreachable_servers(engine: EngineArguments, judge: JudgeArguments | None, same_model: bool) -> None:
    """On a Ray cluster, steps on other nodes cannot reach a server on this machine's 127.0.0.1
    (a vLLM server this run starts listens there only)."""
    local = []
    if _served_on_loopback(engine):
        local.append("--base_url")
    if judge is not None and judge.judge == "pairwise":
        args, reuse = judge_engine_args(judge, engine, same_model)
        if not reuse and _served_on_loopback(args):
            local.append("--judge_base_url")
    if local and _joins_a_cluster():
        log.warning("--use_ray on a running Ray cluster: the server(s) for %s listen on 127.0.0.1 of this "
                    "machine, which steps placed on other nodes cannot reach. On a cluster of several nodes, "
                    "serve the model(s) where every node reaches them and pass %s.",
                    " and ".join(local), " and ".join(local))


def run_in_fresh_process(build: Callable[[], Any], use_ray: bool, yaml_path: Path) -> int:
    """Run a distilabel pipeline from a newly spawned interpreter.

    distilabel forks its step workers from the calling process. Once that process
    has run multi-threaded torch ops (training in ``tpo-data iterate``, a test
    session, a notebook), a forked worker deadlocks in its first multi-threaded
    op, because OpenMP is not fork-safe. A spawned process has no such state.
    Results come back through the batch checkpoints, not through memory; the
    exit code is returned for the caller to judge against them.
    """
    process = multiprocessing.get_context("spawn").Process(
        # distilabel collects its workers' logs only in a process named MainProcess.
        name="MainProcess",
        target=_run_pipeline,
        # The secrets registered here (a token given as a flag, the --api_key_env key): a
        # spawned interpreter starts without them, and they must be masked there too.
        args=(build, use_ray, yaml_path, logging.getLogger().getEffectiveLevel(), secret_values()),
    )
    process.start()
    try:
        process.join()
    except KeyboardInterrupt:  # Ctrl+C reaches the child too; let it stop cleanly.
        process.join()
        raise
    return process.exitcode


def _pass_name(iteration: int, ids: list[str], model_path: str, specs: list[dict[str, Any]]) -> str:
    # distilabel leaves the loaded data and the LLM's model out of its signature, so its
    # cache would hand one model's outputs to another on the same rows (as in an
    # evaluation); the name carries both, and the settings the ledger checks (a server-side
    # seed or a retrained model at the same path are in no step signature either): a pass
    # interrupted before its first finished row must not feed its batches to other settings.
    what = [str(model_path), json.dumps(specs, sort_keys=True, default=str), *ids]
    digest = hashlib.sha256("\n".join(what).encode()).hexdigest()[:12]
    return f"tpo-iter{iteration}-{digest}"


class GenerationLedger:
    """Finished rows of one iteration, one JSON object per instruction.

    Batch checkpoints of an interrupted pass (``checkpoints/``) count as finished.
    """

    def __init__(self, path: Path):
        self.path = path
        self.checkpoints = path.parent / "checkpoints"
        self.rows: dict[str, dict] = {}
        files = [path] if path.exists() else []
        files += sorted(self.checkpoints.glob("*.jsonl")) if self.checkpoints.is_dir() else []
        for file in files:
            for line in file.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    self.rows[row["id"]] = row

    def finished(self, id_: str, judged: bool) -> bool:
        """Whether ``id_`` is done; a row generated without a judge is not, when judging."""
        row = self.rows.get(id_)
        return row is not None and (not judged or isinstance(row.get("scores"), list))

    def save(self, order: list[str]) -> None:
        """Fold checkpoints into the ledger file, rows in ``order`` (the slice's order)."""
        rank = {id_: i for i, id_ in enumerate(order)}
        self.rows = dict(sorted(self.rows.items(), key=lambda kv: rank.get(kv[0], len(rank))))
        write_text_atomic(self.path, "".join(json.dumps(row, ensure_ascii=False) + "\n"
                                             for row in self.rows.values()))
        # Everything checkpointed is now in the ledger.
        for file in self.checkpoints.glob("*.jsonl") if self.checkpoints.is_dir() else []:
            file.unlink()


SPEC = "generation_spec.json"
JUDGE_SPEC = "judge_spec.json"


def generation_spec(prompt: ThoughtPrompt, sampling: SamplingArguments, engine: EngineArguments,
                    model_path: str) -> dict[str, Any]:
    """What makes a ledger row: the model (as the user named it, and when tpo-data trained the
    folder, if it did: the loop retrains M_t at the same path), the thought prompt, the sampling,
    and the engine with its dtype (vLLM in bf16 and transformers in fp32 sample differently)."""
    return {"model": engine.model, "model_trained": trained_at(model_path), "prompt": asdict(prompt),
            "num_samples": sampling.num_samples, "temperature": sampling.temperature,
            "top_p": sampling.top_p, "max_new_tokens": sampling.max_new_tokens, "seed": sampling.seed,
            "engine": engine.engine, "dtype": engine.dtype}


def check_resume(ledger: GenerationLedger, rows: list[dict], spec: dict[str, Any]) -> None:
    """Refuse to add rows to a ledger made with other settings, or rows whose text changed.

    Resuming keeps finished rows as they are, so other settings would mix two kinds of
    samples in one dataset (and the recipe stored with it would describe only the new ones).
    """
    changed = [r["id"] for r in rows
               if r["id"] in ledger.rows and ledger.rows[r["id"]].get("instruction") != r["instruction"]]
    if changed:
        raise TPODataError(
            f"{len(changed)} instruction(s) finished in {ledger.path} have another text now under "
            f"the same id (first: {changed[0]}): the instruction source changed.",
            "Restore the source the run started with, or use a new --output_dir for the new one.",
        )
    _check_spec(ledger.path.parent / SPEC, spec, len(ledger.rows), "generated", lambda differ: (
        "The model at that path was retrained after these samples were generated: use a new "
        "--output_dir to run on the retrained model (this run's versions and models stay)."
        if differ == ["model_trained"] else
        "Rerun with the settings it was started with to resume it, or use a new "
        "--output_dir (with generate, another --iteration) for the new settings."))


def judge_spec(judge: JudgeArguments, judge_path: str) -> dict[str, Any]:
    """What makes a row's scores: the judge and, for an LLM judge, how it is asked."""
    spec: dict[str, Any] = {"judge": judge.judge, "judge_model": judge.judge_model,
                            "judge_trained": trained_at(judge_path)}
    if judge.judge == "pairwise":
        spec.update(judge_mode=judge.judge_mode, judge_max_new_tokens=judge.judge_max_new_tokens,
                    judge_temperature=judge.judge_temperature, force_verdict=judge.force_verdict)
    elif judge.judge == "reward_model":
        spec.update(reward_max_length=judge.reward_max_length)
    return spec


def check_judge(ledger: GenerationLedger, spec: dict[str, Any]) -> None:
    """Refuse to judge the rest of an iteration with another judge than its judged rows had.

    Scores of two judges are not comparable, and the run statistics would add up both.
    Pair selection settings (rho, reject_*) are not part of it: they re-select from the scores.
    """
    judged = sum(isinstance(row.get("scores"), list) for row in ledger.rows.values())
    _check_spec(ledger.path.parent / JUDGE_SPEC, spec, judged, "judged", lambda differ: (
        "Rerun with the judge settings it was started with to resume it, or use a new "
        "--output_dir (with generate, another --iteration) to judge with the new ones."))


def _check_spec(path: Path, spec: dict[str, Any], done: int, verb: str,
                fix: Callable[[list[str]], str]) -> None:
    """Compare ``spec`` with the one recorded at ``path`` when ``done`` rows depend on it; else record it.

    ``fix`` gives the error's fix for the differing keys. A key the record lacks was added
    to tpo-data later: unknown, not different.
    """
    if done and path.is_file():
        before = json.loads(path.read_text())
        differ = sorted(k for k in before if before[k] != spec.get(k))
        if differ:
            raise TPODataError(
                f"{path.parent / 'generations.jsonl'} holds {done} instructions {verb} with other settings: "
                + "; ".join(f"{k} was {json.dumps(before[k])}, now {json.dumps(spec.get(k))}"
                            for k in differ) + ".",
                fix(differ),
            )
    else:
        write_text_atomic(path, json.dumps(spec, indent=2) + "\n")


@dataclass
class GenerationResult:
    rows: list[dict]
    path: Path
    samples: int
    parsed: int

    @property
    def parse_rate(self) -> float:
        return self.parsed / self.samples if self.samples else 0.0


def generate_samples(rows: list[dict], prompt: ThoughtPrompt, engine: EngineArguments,
                     sampling: SamplingArguments, run: RunArguments, model_path: str,
                     judge: JudgeArguments | None = None,
                     judge_path: str | None = None,
                     out_dir: Path | None = None,
                     spec_engine: EngineArguments | None = None) -> GenerationResult:
    """Generate, split and judge K samples for every row, resuming whatever is already done.

    Everything is written to ``out_dir`` (default: the iteration's folder). The ledger records
    ``spec_engine`` (default ``engine``): the engine asked for, where another one answers for it.
    """
    out_dir = (out_dir or run.iteration_dir()).resolve()
    ledger = GenerationLedger(out_dir / "generations.jsonl")
    judged = judge is not None and judge.judge != "none"
    specs = [generation_spec(prompt, sampling, spec_engine or engine, model_path)]
    check_resume(ledger, rows, specs[0])
    if judged:
        specs.append(judge_spec(judge, judge_path or model_path))
        check_judge(ledger, specs[1])
    pending = [r for r in rows if not ledger.finished(r["id"], judged)]
    # Absolute: under Ray the steps run in other processes, on a cluster in other working dirs.
    cache_dir = (Path(run.cache_dir) if run.cache_dir else Path(run.output_dir) / ".distilabel-cache").resolve()
    if pending:
        if run.use_ray:
            require_ray()
            _warn_unreachable_servers(engine, judge if judged else None, (judge_path or model_path) == model_path)
        log.info("Generating %d samples for each of %d instructions (%d already done)",
                 sampling.num_samples, len(pending), len(rows) - len(pending))
        with ExitStack() as stack:
            base_url, served = start_endpoint(engine, model_path, sampling, out_dir, stack)
            llm = build_llm(engine, sampling, model_path, base_url, served)
            judge_step = _judge_factory(
                judge, judge_path or model_path, engine, sampling, model_path, (base_url, served),
                run.input_batch_size, out_dir, stack, run.ray_gpus,
            ) if judged else None
            build = functools.partial(
                build_pipeline, _pass_name(run.iteration, [r["id"] for r in pending], model_path, specs),
                pending, prompt, llm, sampling.num_samples, run.input_batch_size, cache_dir,
                ledger.checkpoints, judge_step,
                generate_gpus=run.ray_gpus if engine.engine == "transformers" else 0,
            )
            exitcode = run_in_fresh_process(build, run.use_ray, out_dir / "pipeline.yaml")
        # The pass's finished rows are in its checkpoints; fold them into the ledger.
        ledger = GenerationLedger(ledger.path)
        ledger.save([r["id"] for r in rows])
        missing = [r["id"] for r in pending if not ledger.finished(r["id"], judged)]
        if missing:
            where = engine.base_url or engine.engine
            raise TPODataError(
                f"The engine ({where}) or the judge returned no output for {len(missing)} of "
                f"{len(pending)} instructions (first: {', '.join(missing[:3])}); a server is down, "
                f"died, or timed out. The {len(ledger.rows)} finished instructions are saved in "
                f"{ledger.path}.",
                "Check the engine (for vLLM: its log in the iteration folder), then rerun the "
                "same command: only the missing instructions are generated again.",
            )
        if exitcode != 0:
            raise TPODataError(
                f"The distilabel pipeline process exited with code {exitcode} after finishing "
                "every instruction; its error is printed above.",
                "Fix the cause shown above and rerun the same command: nothing is generated again.",
            )
    ordered = [ledger.rows[r["id"]] for r in rows]
    samples = sum(len(r["parsed"]) for r in ordered)
    parsed = sum(sum(r["parsed"]) for r in ordered)
    return GenerationResult(ordered, ledger.path, samples, parsed)


def start_endpoint(engine: EngineArguments, model_path: str, sampling: SamplingArguments,
              out_dir: Path, stack: ExitStack,
              log_name: str = "vllm-server.log") -> tuple[str | None, str | None]:
    """Start vLLM when asked to, and check any endpoint before the pipeline starts."""
    from tpo_data.vllm_server import VLLMServer, check_endpoint

    if engine.engine == "transformers":
        return None, None
    if engine.engine == "vllm" and not engine.base_url:
        server = VLLMServer(
            model_path, port=engine.vllm_port, python=engine.vllm_python,
            served_model_name=Path(model_path).name,
            dtype="bfloat16" if engine.dtype == "auto" else engine.dtype,
            kvcache_gb=engine.vllm_kvcache_gb, max_model_len=engine.vllm_max_model_len,
            seed=sampling.seed, gpu_memory_utilization=engine.vllm_gpu_memory_utilization,
            startup_timeout=engine.vllm_startup_timeout, log_path=out_dir / log_name,
        )
        log.info("Starting vLLM on port %d (log: %s)", server.port, server.log_path)
        stack.enter_context(server)
        return server.base_url, server.served_model_name
    served = {url: check_endpoint(url, api_key(engine)) for url in split_endpoints(engine.base_url)}
    name = engine.served_model_name
    if name is None:
        firsts = {url: models[0] if models else None for url, models in served.items()}
        if len(set(firsts.values())) > 1:
            raise TPODataError(
                "The endpoints serve different models: "
                + ", ".join(f"{first} at {url}" for url, first in firsts.items()) + ".",
                "Point --base_url at servers of one model, or name the model all of them serve "
                "with --served_model_name.",
            )
        return engine.base_url, next(iter(firsts.values()))
    # A typo or a server of another model fails here, not as a 404 on every request.
    lacking = {url: models for url, models in served.items() if models and name not in models}
    if lacking:
        raise TPODataError(
            f"--served_model_name {name!r} is not served at "
            + ", ".join(f"{url} (it serves: {', '.join(models)})" for url, models in lacking.items())
            + ".",
            "Use a name each endpoint lists at /v1/models, or leave --served_model_name unset "
            "to take the one they serve.",
        )
    return engine.base_url, name

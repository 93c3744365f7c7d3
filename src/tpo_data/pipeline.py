"""Build and run the TPO distilabel pipeline for one iteration.

The run keeps a ledger of finished instructions (``generations.jsonl``). Each
pass runs the distilabel pipeline over the instructions not yet finished:
- every finished batch is checkpointed by the last step (see ``tpo_data.steps``
  for why distilabel's own cache is not enough after a SIGKILL); a killed run's
  next pass starts after the last finished batch, at the same batch boundaries,
  so content-seeded sampling reproduces an uninterrupted run;
- rows the engine failed on (server down or dead) are not written to the
  ledger; the run stops with a clear error and the next run retries only them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tpo_data.engines import EngineArguments, SamplingArguments, api_key, build_llm
from tpo_data.errors import TPODataError
from tpo_data.prompts import ThoughtPrompt
from tpo_data.steps import KEEP

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
    use_ray: bool = field(default=False, metadata={"help": "Run the pipeline with pipeline.ray()."})

    def iteration_dir(self) -> Path:
        return Path(self.output_dir) / f"iter-{self.iteration}"


def check_context(rows: list[dict], prompt: ThoughtPrompt, tokenizer: Any,
                  max_new_tokens: int, context: int) -> None:
    """Refuse, before any generation, instructions that cannot fit the model's context."""
    too_long = []
    for row in rows:
        ids = tokenizer.apply_chat_template(
            prompt.messages(row["instruction"]), tokenize=True, add_generation_prompt=True
        )
        n = len(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        if n + max_new_tokens > context:
            too_long.append(f"{row['id']} ({n} prompt tokens)")
    if too_long:
        raise TPODataError(
            f"{len(too_long)} instruction(s) do not fit the model's context of {context} tokens "
            f"with --max_new_tokens {max_new_tokens}: {', '.join(too_long[:5])}"
            + (" ..." if len(too_long) > 5 else ""),
            "Shorten or remove those instructions, lower --max_new_tokens, or use a model "
            "with a longer context.",
        )


def build_pipeline(name: str, rows: list[dict], prompt: ThoughtPrompt, llm: Any,
                   num_samples: int, input_batch_size: int, cache_dir: Path,
                   checkpoint_dir: Path | None = None):
    """``load >> generate >> split``; later stages (judge, pairs) attach after ``split``."""
    from distilabel.pipeline import Pipeline
    from distilabel.steps import LoadDataFromDicts

    from tpo_data.steps import SplitThoughts, ThoughtGeneration

    with Pipeline(name=name, cache_dir=cache_dir) as pipeline:
        load = LoadDataFromDicts(name="load", data=rows, batch_size=input_batch_size)
        generate = ThoughtGeneration(
            name="generate", llm=llm, prompt_user=prompt.user, prompt_system=prompt.system,
            num_generations=num_samples, group_generations=True, input_batch_size=input_batch_size,
        )
        split = SplitThoughts(
            name="split", separator=prompt.separator, thought_marker=prompt.thought_marker,
            input_batch_size=input_batch_size,
            checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None,
        )
        load >> generate >> split
    return pipeline


def _pass_name(iteration: int, ids: list[str]) -> str:
    # distilabel leaves the loaded data out of its signature; the name carries it.
    digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:12]
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

    def add(self, rows: list[dict], order: list[str]) -> None:
        """Add finished rows and rewrite the ledger in ``order`` (the slice's order)."""
        for row in rows:
            self.rows[row["id"]] = row
        rank = {id_: i for i, id_ in enumerate(order)}
        self.rows = dict(sorted(self.rows.items(), key=lambda kv: rank.get(kv[0], len(rank))))
        tmp = self.path.with_suffix(".tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w") as fh:
            for row in self.rows.values():
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        # Everything checkpointed is now in the ledger.
        for file in self.checkpoints.glob("*.jsonl") if self.checkpoints.is_dir() else []:
            file.unlink()


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
                     sampling: SamplingArguments, run: RunArguments,
                     model_path: str) -> GenerationResult:
    """Generate and split K samples for every row, resuming whatever is already done."""
    out_dir = run.iteration_dir()
    ledger = GenerationLedger(out_dir / "generations.jsonl")
    pending = [r for r in rows if r["id"] not in ledger.rows]
    cache_dir = Path(run.cache_dir) if run.cache_dir else Path(run.output_dir) / ".distilabel-cache"
    if pending:
        log.info("Generating %d samples for each of %d instructions (%d already done)",
                 sampling.num_samples, len(pending), len(rows) - len(pending))
        with ExitStack() as stack:
            base_url, served = _endpoint(engine, model_path, sampling, out_dir, stack)
            llm = build_llm(engine, sampling, model_path, base_url, served)
            pipeline = build_pipeline(
                _pass_name(run.iteration, [r["id"] for r in pending]), pending, prompt, llm,
                sampling.num_samples, run.input_batch_size, cache_dir, ledger.checkpoints,
            )
            if run.use_ray:
                pipeline = pipeline.ray()
            distiset = pipeline.run(use_cache=True)
        produced = list(distiset["default"]["train"]) if distiset else []
        ok = [{k: r.get(k) for k in KEEP} for r in produced if r.get("engine_ok")]
        ledger.add(ok, [r["id"] for r in rows])
        missing = [r["id"] for r in pending if r["id"] not in ledger.rows]
        if missing:
            where = engine.base_url or engine.engine
            raise TPODataError(
                f"The engine ({where}) returned no output for {len(missing)} of {len(pending)} "
                f"instructions (first: {', '.join(missing[:3])}); the server is down, died, or "
                f"timed out. The {len(ledger.rows)} finished instructions are saved in "
                f"{ledger.path}.",
                "Check the engine (for vLLM: its log in the iteration folder), then rerun the "
                "same command: only the missing instructions are generated again.",
            )
    ordered = [ledger.rows[r["id"]] for r in rows]
    samples = sum(len(r["parsed"]) for r in ordered)
    parsed = sum(sum(r["parsed"]) for r in ordered)
    return GenerationResult(ordered, ledger.path, samples, parsed)


def _endpoint(engine: EngineArguments, model_path: str, sampling: SamplingArguments,
              out_dir: Path, stack: ExitStack) -> tuple[str | None, str | None]:
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
            seed=sampling.seed, startup_timeout=engine.vllm_startup_timeout,
            log_path=out_dir / "vllm-server.log",
        )
        log.info("Starting vLLM on port %d (log: %s)", server.port, server.log_path)
        stack.enter_context(server)
        return server.base_url, server.served_model_name
    models = check_endpoint(engine.base_url, api_key(engine))
    return engine.base_url, engine.served_model_name or (models[0] if models else None)

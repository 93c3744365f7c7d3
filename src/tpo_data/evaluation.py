"""Held-out evaluation of a TPO loop (``tpo-data eval``): does thinking help?

On the recipe's held-out instructions (``--holdout_size``; no iteration ever
trains on them), every model answers once: the seed model M0 and each trained
model M_t with the recipe's thought prompt, the direct-response baseline (if
any) with the plain instruction. The judge of the recipe then compares, per
instruction, M_t against M0 and every thought model against the baseline. It
sees the instruction and the two responses only (never a thought; an output
that did not split is shown whole), in both orders; ties and unparsable
verdicts count as half (:mod:`tpo_data.eval_metrics`).

Also reported per model: parse rate (format adherence) and mean thought and
response length. Output in ``--eval_dir`` (default ``<output_dir>/eval``):
``report.json``, ``report.md``, ``win_rate.png``, ``lengths.png``,
``categories.png``; each model's answers in ``outputs/<name>-<answerer>/``,
where ``<answerer>`` fingerprints the model folder (path and weight files),
its thought prompt and the sampling settings, so a name that now means another
model (the baseline after more iterations, a retrained M_t) answers afresh
instead of reusing old answers. Answers and judgments are saved as they come,
so a rerun redoes nothing.

Models default to the loop's: M0 is ``--model``, M_t is
``<output_dir>/models/iter-t`` and the baseline is the last model of the
direct-response loop in ``<output_dir>/direct`` (``tpo-data iterate --baseline``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tpo_data.engines import EngineArguments, SamplingArguments, build_llm, check_one_model_per_endpoint
from tpo_data.errors import TPODataError
from tpo_data.files import read_jsonl_log
from tpo_data.eval_metrics import by_category, outcome, output_stats, shown_response, win_rate
from tpo_data.eval_report import position_note, write_report
from tpo_data.instructions import (
    InstructionArguments,
    SliceLedger,
    load_instructions,
    select_holdout_rows,
    source_fingerprint,
)
from tpo_data.judges import POLICY, JudgeArguments, judge_calls, judge_engine_args, judge_sampling
from tpo_data.models import model_fingerprint, resolve_model
from tpo_data.pipeline import (
    GenerationLedger,
    RunArguments,
    check_context,
    check_judge_context,
    generate_samples,
    generation_spec,
    serving_context,
    start_endpoint,
)
from tpo_data.prompts import load_prompt
from tpo_data.secrets import scrub
from tpo_data.verdicts import neutralize

log = logging.getLogger("tpo_data")

SEED_NAME = "M0"
BASELINE_NAME = "direct"
REPORT = "report.json"


@dataclass
class EvalArguments:
    """What ``tpo-data eval`` compares (everything else comes from the TPO recipe)."""

    eval_models: list[str] = field(
        default_factory=list,
        metadata={"help": "Models to evaluate, in order, as NAME=PATH (the first is the reference, "
                  "like M0). Default: the loop's M0 (--model) and <output_dir>/models/iter-*."},
    )
    eval_baseline: str | None = field(
        default=None,
        metadata={"help": "Direct-response baseline model as NAME=PATH (answers the plain "
                  "instruction). Default: the last model of <output_dir>/direct, if any."},
    )
    eval_size: int = field(
        default=0, metadata={"help": "Held-out instructions to use (0: all --holdout_size of them)."}
    )
    eval_dir: str | None = field(
        default=None, metadata={"help": "Report folder (default: <output_dir>/eval)."}
    )

    def __post_init__(self) -> None:
        if self.eval_size < 0:
            raise TPODataError(f"--eval_size {self.eval_size} is negative.",
                               "Pass 0 (every held-out instruction) or a positive count.")


@dataclass(frozen=True)
class EvalModel:
    name: str
    path: str
    prompt: str  # thought prompt it answers with
    baseline: bool = False


def _named(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise TPODataError(f"Model {spec!r} is not NAME=PATH.",
                           "Name every model, for example --eval_models M0=embedded M1=out/models/iter-1")
    return name, path


def loop_models(output_dir: str | Path, seed_model: str) -> list[tuple[str, str]]:
    """(name, path) of M0 and of every finished model M_t of the loop in ``output_dir``."""
    from tpo_data.loop import trained_models

    return [(SEED_NAME, seed_model)] + [(f"M{t}", str(p)) for t, p in trained_models(output_dir)]


def resolve_models(args: EvalArguments, run: RunArguments, engine: EngineArguments) -> list[EvalModel]:
    from tpo_data.loop import baseline_dir, trained_models

    named = [_named(s) for s in args.eval_models] or loop_models(run.output_dir, engine.model)
    models = [EvalModel(n, p, run.thought_prompt) for n, p in named]
    if args.eval_baseline:
        models.append(EvalModel(*_named(args.eval_baseline), "direct", baseline=True))
    elif (found := trained_models(baseline_dir(run.output_dir))):
        models.append(EvalModel(BASELINE_NAME, str(found[-1][1]), "direct", baseline=True))
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise TPODataError(f"Model names repeat: {names}.", "Give every model its own NAME.")
    if len(models) < 2:
        raise TPODataError(
            f"Only {len(models)} model to evaluate ({names[0]}): nothing to compare it with.",
            "Train at least one iteration first (tpo-data iterate), or pass --eval_models "
            "M0=PATH M1=PATH.",
        )
    return models


def holdout_rows(instructions: InstructionArguments, size: int, output_dir: str | Path) -> list[dict]:
    """The held-out rows, checked against the loops' slice ledgers: none was trained on."""
    from tpo_data.loop import baseline_dir

    if instructions.holdout_size < 1:
        raise TPODataError(
            "The recipe holds out no instructions (--holdout_size 0), so nothing is left to "
            "evaluate on without testing on training data.",
            "Set --holdout_size (the built-in recipes hold out 40) before the first iteration.",
        )
    every = load_instructions(instructions)
    rows = select_holdout_rows(every, instructions)
    rows = rows[:size] if size else rows
    # The holdout is recomputed from the flags: other flags than the loop's would move
    # trained instructions into it, and an edited source would hide them under other ids.
    for ledger_path in (Path(output_dir) / "slices.json", baseline_dir(output_dir) / "slices.json"):
        if not ledger_path.is_file():
            continue
        ledger = SliceLedger(ledger_path)
        ledger.check_source(source_fingerprint(every, instructions),
                            "evaluate another run's models with their own output directory")
        used = ledger.used_ids()
        trained = [r["id"] for r in rows if r["id"] in used]
        if trained:
            raise TPODataError(
                f"{len(trained)} of the {len(rows)} held-out instructions were trained on "
                f"(recorded in {ledger_path}; first: {', '.join(map(repr, trained[:3]))}).",
                "Evaluate with the instruction flags the loop ran with (--instructions, "
                "--holdout_size, --slice_seed, columns; the ledger's 'source' lists them).",
            )
    return rows


def answer(model: EvalModel, path: str, rows: list[dict], engine: EngineArguments,
           sampling: SamplingArguments, run: RunArguments, folder: Path,
           judge_server: "JudgeServer | None" = None) -> list[dict]:
    """One sample per held-out instruction from ``model`` (local folder ``path``), resumable.

    A model that the judge's vLLM server serves anyway answers through that server.
    """
    prompt, one = load_prompt(model.prompt), replace(sampling, num_samples=1)
    asked = replace(engine, model=model.path)
    answerer = model_fingerprint(path, generation_spec(prompt, one, asked, path))
    out_dir = folder / "outputs" / f"{model.name}-{answerer}"
    ledger = GenerationLedger(out_dir / "generations.jsonl")
    if any(not ledger.finished(r["id"], False) for r in rows):
        log.info("Evaluation: %s answers %d held-out instructions", model.name, len(rows))
        if judge_server and judge_server.serves(path):
            engine = judge_server.engine_for(model.path)
    result = generate_samples(rows, prompt, replace(engine, model=model.path), one, run, path,
                              out_dir=out_dir, spec_engine=asked)
    return result.rows


class JudgeServer:
    """The pair-wise judge's endpoint, started on first use and shared with M0's answers."""

    def __init__(self, judge: JudgeArguments, engine: EngineArguments, sampling: SamplingArguments,
                 judge_path: str, folder: Path, stack: ExitStack):
        self.engine, _ = judge_engine_args(judge, engine, same_model=False)
        # Only a model the policy engine would also serve through a vLLM server of its own, with
        # the same settings: answers through the judge's server are then the same as its own.
        self.shareable = engine.engine == self.engine.engine == "vllm" and not engine.base_url
        self.sampling = judge_sampling(judge, sampling)
        self.path, self.folder, self.stack = judge_path, folder, stack
        self._endpoint: tuple[str | None, str | None] | None = None

    def serves(self, model_path: str) -> bool:
        # Only a vLLM server we start is worth sharing; in-process models load per use anyway.
        return (self.shareable and not self.engine.base_url
                and Path(model_path).resolve() == Path(self.path).resolve())

    def endpoint(self) -> tuple[str | None, str | None]:
        if self._endpoint is None:
            self._endpoint = start_endpoint(self.engine, self.path, self.sampling, self.folder,
                                            self.stack, log_name="vllm-judge.log")
        return self._endpoint

    def engine_for(self, model: str) -> EngineArguments:
        base_url, served = self.endpoint()
        return replace(self.engine, model=model, engine="openai", base_url=base_url,
                       served_model_name=served)

    def llm(self) -> Any:
        base_url, served = self.endpoint()
        llm = build_llm(self.engine, self.sampling, self.path, base_url, served)
        llm.load()
        return llm


class JudgmentCache:
    """Verdicts already obtained, keyed by judge and exact judge input (``judgments.jsonl``)."""

    def __init__(self, path: Path, judge_label: str):
        self.path, self.label = path, judge_label
        self.entries: dict[str, dict] = {entry["key"]: entry for entry in read_jsonl_log(path)}

    def key(self, call: tuple[str, str, str]) -> str:
        return hashlib.sha256(json.dumps([self.label, *call]).encode()).hexdigest()

    def missing(self, calls: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
        """The calls not judged yet, each once, in order."""
        return list(dict.fromkeys(c for c in calls if self.key(c) not in self.entries))

    def add(self, call: tuple[str, str, str], entry: dict) -> None:
        entry = {"key": self.key(call), **entry}
        self.entries[entry["key"]] = entry
        with open(self.path, "a") as fh:
            fh.write(json.dumps(entry) + "\n")


def _pairwise_verdicts(calls: list[tuple[str, str, str]], judge: JudgeArguments,
                       server: JudgeServer, cache: JudgmentCache) -> list[dict]:
    todo = cache.missing(calls)
    if todo:
        log.info("Evaluation: %d judge calls (%d cached)", len(todo), len(calls) - len(todo))
        llm = server.llm()
        # Saved in chunks: an interrupted evaluation keeps what was judged.
        for start in range(0, len(todo), 64):
            chunk = todo[start:start + 64]
            for call, verdict in zip(chunk, judge_calls(llm, chunk, judge.force_verdict)):
                cache.add(call, {"r": verdict.r, "forced": verdict.forced})
    return [cache.entries[cache.key(c)] for c in calls]


def _reward_verdicts(calls: list[tuple[str, str, str]], judge: JudgeArguments, judge_path: str,
                     cache: JudgmentCache) -> list[dict]:
    """A point-wise reward model as a comparison: r = sign(reward(a) - reward(b))."""
    from tpo_data.reward_models import RewardModelScorer

    todo = cache.missing(calls)
    if todo:
        # The settings that scored the training pairs (pipeline.py).
        scorer = RewardModelScorer(judge_path, batch_size=judge.reward_batch_size,
                                   max_length=judge.reward_max_length)
        texts = list(dict.fromkeys((c[0], t) for c in todo for t in c[1:]))
        rewards = dict(zip(texts, scorer.score([t[0] for t in texts], [t[1] for t in texts])))
        for call in todo:
            a, b = rewards[(call[0], call[1])], rewards[(call[0], call[2])]
            cache.add(call, {"r": (a > b) - (a < b), "forced": False})
    return [cache.entries[cache.key(c)] for c in calls]


def evaluate(instructions: InstructionArguments, engine: EngineArguments,
             sampling: SamplingArguments, run: RunArguments, judge: JudgeArguments,
             args: EvalArguments) -> dict[str, Any]:
    """Answer, judge, and write the report; return the report dict."""
    if judge.judge == "none":
        raise TPODataError("The evaluation needs a judge, and the recipe sets --judge none.",
                           "Pass --judge pairwise (an LLM judge) or --judge reward_model.")
    models = resolve_models(args, run, engine)
    rows = holdout_rows(instructions, args.eval_size, run.output_dir)
    folder = Path(args.eval_dir) if args.eval_dir else Path(run.output_dir) / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    # One sample per instruction: as many instructions per batch as the loop has samples in flight.
    eval_run = replace(run, output_dir=str(folder), iteration=0,
                       cache_dir=run.cache_dir or str(folder / ".distilabel-cache"),
                       input_batch_size=run.input_batch_size * sampling.num_samples)
    # Resolved once: resolving the embedded model verifies its checksums.
    paths = {m.name: str(resolve_model(m.path)) for m in models}
    distinct = len(set(paths.values()))
    if distinct > 1:
        check_one_model_per_endpoint(engine, f"the evaluation compares {distinct} models")
    seed_path = paths[models[0].name]
    judge_path = seed_path if judge.judge_model == POLICY else str(resolve_model(judge.judge_model, "--judge_model"))
    from transformers import AutoTokenizer

    # Before any answer: an over-long request would fail its whole batch, reported as a dead server.
    for m in models:
        if context := serving_context(paths[m.name], engine):
            check_context(rows, load_prompt(m.prompt), AutoTokenizer.from_pretrained(paths[m.name]),
                          sampling.max_new_tokens, context)
    if judge.judge == "pairwise":
        judge_context = serving_context(judge_path, judge_engine_args(judge, engine, same_model=False)[0])
        if judge_context:
            check_judge_context(rows, AutoTokenizer.from_pretrained(judge_path), sampling.max_new_tokens,
                                judge.judge_max_new_tokens, judge_context)
    with ExitStack() as stack:
        server = JudgeServer(judge, engine, sampling, judge_path, folder, stack) \
            if judge.judge == "pairwise" else None
        # Models the judge's server can serve answer last, through it: one server start fewer.
        order = sorted(models, key=lambda m: bool(server and server.serves(paths[m.name])))
        answers = {m.name: answer(m, paths[m.name], rows, engine, sampling, eval_run, folder, server)
                   for m in order}
        report = _judge_and_report(models, rows, answers, judge, engine, sampling, judge_path,
                                   server, folder)
    return report


def _judge_and_report(models: list[EvalModel], rows: list[dict], answers: dict[str, list[dict]],
                      judge: JudgeArguments, engine: EngineArguments, sampling: SamplingArguments,
                      judge_path: str, server: JudgeServer | None, folder: Path) -> dict[str, Any]:
    label = f"{judge.judge} {judge.judge_model}" + (
        f" ({judge.judge_engine or engine.engine})" if judge.judge == "pairwise" else "")
    # The judge's weights (a judge retrained at the same path is another judge) and endpoint too.
    cache = JudgmentCache(folder / "judgments.jsonl", json.dumps(
        [label, judge.judge_max_new_tokens, judge.judge_temperature, judge.force_verdict,
         judge_path, *([judge.reward_max_length] if judge.judge == "reward_model" else []),
         model_fingerprint(judge_path, {}), judge.judge_base_url]))

    def shown(name: str, i: int) -> str:
        row = answers[name][i]
        text = shown_response(row["generation"][0], row["responses"][0], bool(row["parsed"][0]))
        return neutralize(text)

    reference = models[0]
    baseline = models[-1] if models[-1].baseline else None
    compared = [m for m in models if m is not baseline]
    pairs = [(m.name, reference.name) for m in compared[1:]]
    pairs += [(m.name, baseline.name) for m in compared] if baseline else []
    calls = [(rows[i]["instruction"], *((shown(x, i), shown(y, i)) if order == 0
                                        else (shown(y, i), shown(x, i))))
             for x, y in pairs for i in range(len(rows)) for order in (0, 1)]
    if server is not None:
        verdicts = _pairwise_verdicts(calls, judge, server, cache)
    else:
        verdicts = _reward_verdicts(calls, judge, judge_path, cache)

    comparisons = []
    categories = [r.get("category") or "uncategorized" for r in rows]
    for p, (x, y) in enumerate(pairs):
        block = verdicts[p * 2 * len(rows):(p + 1) * 2 * len(rows)]
        outcomes = [outcome(block[2 * i]["r"], block[2 * i + 1]["r"]) for i in range(len(rows))]
        comparisons.append({
            "model": x, "reference": y, "overall": win_rate(outcomes).as_dict(),
            "categories": {c: w.as_dict() for c, w in by_category(outcomes, categories).items()},
            "outcomes": outcomes,
        })
    report = {
        "instructions": len(rows),
        "holdout_ids": [r["id"] for r in rows],
        "sampling": {"temperature": sampling.temperature, "top_p": sampling.top_p,
                     "max_new_tokens": sampling.max_new_tokens, "seed": sampling.seed},
        "judge": {"label": label, "settings": asdict(judge), "calls": len(verdicts),
                  "unparsable": sum(v["r"] == 0 for v in verdicts),
                  "forced": sum(bool(v.get("forced")) for v in verdicts),
                  # Positions only mean something to an LLM judge (a reward model is symmetric).
                  "first_wins": sum(v["r"] == 1 for v in verdicts) if server is not None else None},
        "models": [{"name": m.name, "path": m.path, "prompt": m.prompt, "baseline": m.baseline,
                    "stats": output_stats(answers[m.name])} for m in models],
        "comparisons": comparisons,
        "report_dir": str(folder),
    }
    (folder / REPORT).write_text(scrub(json.dumps(report, indent=2, default=str)))
    write_report(report, folder)
    return report


def format_summary(report: dict[str, Any]) -> str:
    """A few lines for the console: parse rates and win rates."""
    lines = ["Parse rate: " + ", ".join(
        f"{m['name']} {m['stats']['parse_rate']:.1%}" for m in report["models"])]
    for c in report["comparisons"]:
        w = c["overall"]
        lines.append(f"Win rate {c['model']} vs {c['reference']}: {w['win_rate']:.1%} "
                     + (f"(± {w['ci95']:.1%}, n={w['n']})" if w["n"] > 1 else f"(n={w['n']})"))
    if note := position_note(report["judge"]):
        lines.append(note)
    lines.append(f"Report: {Path(report['report_dir']) / 'report.md'} (plots beside it)")
    return "\n".join(lines)

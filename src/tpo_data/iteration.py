"""One TPO iteration's data stage: instructions -> K samples -> split -> judge -> pairs.

This is the logic behind ``pipelines/tpo.py`` and ``tpo-data generate``. The
distilabel pipeline generates, splits and judges; then pairs are selected over
the whole iteration and written, with every candidate, to the local store as
version ``iter-N``. Rerunning a finished iteration changes nothing and prints
its statistics again.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

from tpo_data import hub
from tpo_data.engines import EngineArguments, SamplingArguments
from tpo_data.errors import TPODataError
from tpo_data.files import write_text_atomic
from tpo_data.instructions import (
    InstructionArguments,
    SliceLedger,
    load_instructions,
    select_iteration_rows,
)
from tpo_data.judges import POLICY, JudgeArguments, judge_engine_args
from tpo_data.models import resolve_model
from tpo_data.pair_data import (
    IterationData,
    build_iteration_data,
    format_stats,
    to_datasets,
    truncated,
    unknown_truncation,
)
from tpo_data.pipeline import (
    GenerationResult,
    RunArguments,
    check_context,
    check_judge_context,
    generate_samples,
    serving_context,
)
from tpo_data.prompts import ThoughtPrompt, load_prompt
from tpo_data.secrets import scrub
from tpo_data.store import MANIFEST, LocalStore, write_iteration
from tpo_data.training import LINEAGE

log = logging.getLogger("tpo_data")

ARGUMENT_TYPES = (InstructionArguments, EngineArguments, SamplingArguments, RunArguments,
                  JudgeArguments)
STATS_FILE = "pairs_stats.json"


def resolve_judge(judge: JudgeArguments, model_path: str) -> str | None:
    """The judge's local model path (None without a judge), checked before any generation."""
    if judge.judge == "none":
        return None
    path = model_path if judge.judge_model == POLICY else str(resolve_model(judge.judge_model, "--judge_model"))
    if judge.judge == "reward_model":
        from tpo_data.armorm import load_config_dict
        from tpo_data.reward_models import detect_kind

        detect_kind(path, load_config_dict(path))  # refuses a causal LM with a clear message
    return path


def run_generation(instructions: InstructionArguments, engine: EngineArguments,
                   sampling: SamplingArguments, run: RunArguments,
                   judge: JudgeArguments | None = None) -> GenerationResult:
    """Validate everything that can be checked cheaply, then generate and judge (resuming if needed)."""
    from transformers import AutoTokenizer

    judge = judge or JudgeArguments(judge="none")
    if judge.judge != "none":
        require_pairs_possible(sampling)
    prompt = load_prompt(run.thought_prompt)
    model_path = str(resolve_model(engine.model))
    judge_path = resolve_judge(judge, model_path)
    rows = load_instructions(instructions)
    out_dir = run.iteration_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    ledger = SliceLedger(Path(run.output_dir) / "slices.json")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    context = serving_context(model_path, engine)
    judge_context = None
    if judge.judge == "pairwise":
        judge_context = serving_context(judge_path, judge_engine_args(judge, engine, judge_path == model_path)[0])
        judge_tokenizer = tokenizer if judge_path == model_path else AutoTokenizer.from_pretrained(judge_path)

    def fits(selected: list[dict]) -> None:
        if context:
            check_context(selected, prompt, tokenizer, sampling.max_new_tokens, context)
        if judge_context:
            check_judge_context(selected, judge_tokenizer, sampling.max_new_tokens,
                                judge.judge_max_new_tokens, judge_context)

    rows = select_iteration_rows(rows, instructions, ledger, run.iteration, check=fits)

    result = generate_samples(rows, prompt, engine, sampling, run, model_path, judge, judge_path)
    # After generation: a rerun that generate_samples refuses keeps the settings on record.
    write_text_atomic(out_dir / "run_config.json", scrub(json.dumps({
        "instructions": asdict(instructions), "engine": asdict(engine),
        "sampling": asdict(sampling), "run": asdict(run), "judge": asdict(judge),
        "model_path": model_path, "judge_path": judge_path,
    }, indent=2, default=str)))
    return result


def summarize_generation(result: GenerationResult) -> str:
    failed = result.samples - result.parsed
    # Unknown: rows generated before the flag existed, or by an engine that gives no finish reason.
    unknown = sum(unknown_truncation(row) for row in result.rows)
    if unknown == result.samples:
        cut = "unknown"
    else:
        cut = str(sum(sum(truncated(row)) for row in result.rows))
        cut += f" (unknown for {unknown})" if unknown else ""
    return (
        f"Samples: {result.samples} for {len(result.rows)} instructions in {result.path}\n"
        f"Parsed: {result.parsed}/{result.samples} ({result.parse_rate:.1%}); "
        f"parse failures (no separator): {failed}; cut off at max_new_tokens: {cut}"
    )


def require_pairs_possible(sampling: SamplingArguments) -> None:
    if sampling.num_samples < 2:
        raise TPODataError(
            f"--num_samples {sampling.num_samples} cannot form a chosen/rejected pair.",
            "Use --num_samples 2 or more (the paper uses 8).",
        )
    if sampling.temperature == 0:
        raise TPODataError(
            "--temperature 0 samples greedily: an instruction's K samples would all be the same "
            "answer, so no pair could differ.",
            "Sample with --temperature above 0 (the paper uses 0.8).",
        )


def write_pairs(result: GenerationResult, prompt: ThoughtPrompt, engine: EngineArguments,
                sampling: SamplingArguments, run: RunArguments, judge: JudgeArguments) -> dict:
    """Select pairs over the iteration and write version ``iter-N``; return the run statistics.

    A version that already exists is never rewritten: its saved statistics are returned.
    """
    store = LocalStore(run.store_dir())
    version = f"iter-{run.iteration}"
    stats_path = run.iteration_dir() / STATS_FILE
    if (store.root / version / MANIFEST).is_file() and stats_path.is_file():
        # The stats are this run's; the version may be another run's (a --store shared later).
        _check_own_version(store, version, result, engine)
        log.info("Version %s already exists in %s; nothing to write", version, store.root)
        return json.loads(stats_path.read_text())
    data = build_iteration_data(result.rows, prompt, judge, run.iteration)
    if (store.root / version / MANIFEST).is_file():
        # Written by this run before it stopped, or by another run sharing --store.
        _check_own_version(store, version, result, engine, data)
    else:
        pairs, candidates = to_datasets(data)
        config_path = run.iteration_dir() / "run_config.json"
        pipeline_yaml = run.iteration_dir() / "pipeline.yaml"
        write_iteration(
            store, version, pairs=pairs, candidates=candidates, iteration=run.iteration,
            parent_model=engine.model, recipe=json.loads(config_path.read_text()),
            seed=sampling.seed,
            instruction_slice={"iteration": run.iteration, "ids": [r["id"] for r in result.rows]},
            pipeline_yaml=pipeline_yaml.read_text() if pipeline_yaml.is_file() else None,
            parent_version=trained_on(engine.model, store),
        )
    data.stats["store"] = str(store.root / version)
    stats_path.write_text(json.dumps(data.stats, indent=2, default=str))
    return data.stats


def trained_on(model: str, store: LocalStore) -> str | None:
    """The version of ``store`` a model trained by this project learnt from (``iter-1-curated``
    under curation), from its lineage.json; None for any other model (M0, or a model trained on
    another store's data or the Hub's, whose version names mean nothing here). Matched on the
    version's manifest sha, not the store's path: a moved output folder holds the same data."""
    lineage = Path(model) / LINEAGE
    if not lineage.is_file():
        return None
    dataset = json.loads(lineage.read_text()).get("dataset") or {}
    version = dataset.get("version")
    if dataset.get("source") != "store" or not version or not (store.root / version / MANIFEST).is_file():
        return None
    return version if store.manifest_sha256(version) == dataset.get("manifest_sha256") else None


def _check_own_version(store: LocalStore, version: str, result: GenerationResult,
                       engine: EngineArguments, data: IterationData | None = None) -> None:
    """Refuse to report (and train on) a stored version whose pairs are not the ones this run selects
    (without ``data``, only its parent model and instruction slice are compared)."""
    manifest = store.manifest(version)

    def key(pairs) -> list:
        return [(p["instruction_id"], p["chosen"], p["rejected"]) for p in pairs]

    differ = [what for what, mine, stored in (
        ("parent model", engine.model, manifest.get("parent_model")),
        ("instruction slice", [r["id"] for r in result.rows],
         (manifest.get("instruction_slice") or {}).get("ids")),
    ) if mine != stored]
    if not differ and data is not None and key(store.load(version, "pairs")) != key(data.pairs):
        differ = ["pairs (other selection settings, such as --rho or --reject_truncated)"]
    if differ:
        raise TPODataError(
            f"Version {version} in store {store.root} is not what this run makes: its "
            + "; ".join(differ) + " differ. It was written by another run sharing the store, or by "
            "this one with other settings; versions are immutable.",
            "Rerun with the settings that wrote it, give this run its own store (--store, default "
            "<output_dir>/store), or (with generate) another --iteration; this run's generations are kept.",
        )


def main(argv: list[str] | None = None, prog: str | None = None) -> GenerationResult:
    """Parse ``--config recipe.yaml`` plus CLI overrides (TRL style) and run the stage."""
    from tpo_data.cli import parse_recipe, recipe_parser
    from tpo_data.evaluation import EvalArguments
    from tpo_data.loop import LoopArguments

    # The loop's recipe also runs one iteration: its loop and eval keys are not for this stage.
    instructions, engine, sampling, run, judge = parse_recipe(
        recipe_parser(ARGUMENT_TYPES, prog), argv, also_reads=(LoopArguments, EvalArguments))
    hub.check_push_to_hub(run.push_to_hub, judged=judge.judge != "none")
    result = run_generation(instructions, engine, sampling, run, judge)
    print(summarize_generation(result))
    if judge.judge != "none":
        stats = write_pairs(result, load_prompt(run.thought_prompt), engine, sampling, run, judge)
        print(format_stats(stats))
        print(f"Dataset: {stats['store']} (configs pairs, candidates)")
        if run.push_to_hub:
            print(hub.push_iteration(LocalStore(run.store_dir()), f"iter-{run.iteration}",
                                     run.push_to_hub, private=run.hub_private))
    return result

"""PIT data stage behind ``pipelines/pit.py``: preference data -> improvement rows and round-2 references.

Two store versions (docs/SCHEMA.md style, one parquet per config):

- ``pit-sft-1`` (``--stage rows``): improvement rows (x, y_ref = y_l, y_better = y_w)
  built by :func:`tpo_data.pit.build_improvement_rows`, split into ``train`` and a
  held-out ``test`` config. Columns: id, instruction, reference, better, prompt
  (the improvement prompt, conversational), completion ([assistant y_w]).
- ``pit-rl-refs-2`` (``--stage refs``): for every train instruction, answers sampled
  from ``--model`` (a distilabel ``TextGeneration`` step over our engines) as y_ref for
  RL round 2. Columns: id, instruction, reference, sample_index, model_name. Use the
  base policy whose answers PIT improves, or the round-1 checkpoint ("the current policy").

Preference sources (``--preferences``): a local JSONL/JSON/parquet file, a version
folder of a TPO store (its ``pairs`` config; responses, not thoughts), or a Hub dataset
read from the local cache only, never downloaded.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tpo_data.engines import EngineArguments, SamplingArguments, build_llm
from tpo_data.errors import TPODataError
from tpo_data.pit import build_improvement_rows
from tpo_data.pit_training import REFS_VERSION, SFT_VERSION, TEST, TRAIN
from tpo_data.store import MANIFEST, LocalStore

log = logging.getLogger("tpo_data")
STAGES = ("rows", "refs", "all")


@dataclass
class PITPipelineArguments:
    """Where preferences come from and where the PIT versions go."""

    preferences: str = field(
        default="",
        metadata={"help": "Preference data: a .jsonl/.json/.parquet file, a TPO store version folder "
                  "(e.g. outputs/tpo/store/iter-1), or a cached Hub dataset id."},
    )
    preferences_config: str | None = field(default=None, metadata={"help": "Hub dataset config."})
    preferences_split: str = field(default="train", metadata={"help": "Hub dataset split."})
    max_preferences: int | None = field(default=None, metadata={"help": "Read at most this many preference rows."})
    holdout_size: int = field(default=16, metadata={
        "help": "Improvement rows held out as the 'test' config (whole instructions: a few more "
                "where an instruction has several rows)."})
    split_seed: int = field(default=0, metadata={"help": "Seed of the train/test split."})
    stage: str = field(
        default="all",
        metadata={"help": "rows (pit-sft-1), refs (pit-rl-refs-2, needs pit-sft-1) or all.",
                  "choices": list(STAGES)},
    )
    store: str = field(default="outputs/pit/store", metadata={"help": "Local dataset store folder."})
    sft_version: str = field(default=SFT_VERSION, metadata={"help": "Version name of the improvement rows."})
    refs_version: str = field(default=REFS_VERSION, metadata={"help": "Version name of the round-2 references."})
    output_dir: str = field(default="outputs/pit", metadata={"help": "Run folder (distilabel cache, server logs)."})
    input_batch_size: int = field(default=8, metadata={"help": "Instructions per pipeline batch."})

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise TPODataError(f"Unknown --stage {self.stage!r}.", f"Use one of: {', '.join(STAGES)}.")


@contextmanager
def _hub_cache_only():
    """Make ``datasets`` and ``huggingface_hub`` use the local cache and never the network."""
    from unittest import mock

    import datasets
    import huggingface_hub.constants as hub_constants

    with mock.patch.object(hub_constants, "HF_HUB_OFFLINE", True), \
            mock.patch.object(datasets.config, "HF_HUB_OFFLINE", True):
        yield


def looks_like_hub_id(source: str) -> bool:
    """A Hub dataset id is "name" or "owner/name" and no local path; anything else (a path that
    exists, starts like one, or has a file suffix) was meant as a local file or folder."""
    path = Path(source)
    return not (path.exists() or source.startswith((".", "/", "~")) or path.suffix or source.count("/") > 1)


def read_preferences(args: PITPipelineArguments) -> tuple[list[dict[str, Any]], str]:
    """Preference rows and a description of their source for the manifest."""
    source = args.preferences
    if not source:
        raise TPODataError("No preference data given.",
                           "Pass --preferences FILE.jsonl, a TPO store version folder, or a cached Hub id.")
    path = Path(source).expanduser()
    if path.is_dir() and (path / MANIFEST).is_file():
        rows = LocalStore(path.parent).load(path.name, "pairs").to_list()
        described = f"tpo-store:{path.resolve()}"
    elif path.is_file():
        from datasets import load_dataset

        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(path.suffix.lower())
        if kind is None:
            raise TPODataError(f"Unsupported preference file {path}.", "Use .jsonl, .json or .parquet.")
        rows = load_dataset(kind, data_files=str(path), split="train").to_list()
        described = f"file:{path.resolve()}"
    elif not looks_like_hub_id(source):
        state = "is neither a preference file nor a store version folder" if path.exists() else "does not exist"
        raise TPODataError(f"--preferences {source} {state}.",
                           "Pass a .jsonl/.json/.parquet file or a TPO store version folder like "
                           "outputs/tpo/store/iter-1 (run the TPO pipeline first), or a cached Hub id.")
    else:
        from datasets import load_dataset

        try:
            with _hub_cache_only():
                rows = load_dataset(source, args.preferences_config, split=args.preferences_split).to_list()
        except Exception as err:  # noqa: BLE001 - every failure has the same remedy
            raise TPODataError(
                f"The Hub dataset {source!r} is not in the local cache ({type(err).__name__}); "
                "PIT reads Hub datasets offline only.",
                f"On a machine with access, run datasets.load_dataset({source!r}, split="
                f"{args.preferences_split!r}).to_json('prefs.jsonl') and pass --preferences prefs.jsonl.",
            ) from None
        described = f"hub:{source}:{args.preferences_config or 'default'}:{args.preferences_split}"
    if args.max_preferences is not None:
        rows = rows[: args.max_preferences]
    return rows, described


def split_rows(rows: list[dict], holdout_size: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, test) split by instruction, so no test instruction is trained on.

    Whole instructions go to test, smallest seeded hash of their text first, until it
    holds at least ``holdout_size`` rows (preference sets often have several pairs per
    prompt); at least one instruction stays for training.
    """
    def key(instruction: str) -> str:
        return hashlib.sha256(f"{seed}\x00{instruction}".encode()).hexdigest()

    per_instruction = Counter(r["instruction"] for r in rows)
    held: set[str] = set()
    count = 0
    for instruction in sorted(per_instruction, key=key)[:-1]:
        if count >= holdout_size:
            break
        held.add(instruction)
        count += per_instruction[instruction]
    return ([r for r in rows if r["instruction"] not in held],
            [r for r in rows if r["instruction"] in held])


def _features(refs: bool):
    from datasets import Features, List, Value

    if refs:
        return Features({"id": Value("string"), "instruction": Value("string"), "reference": Value("string"),
                         "sample_index": Value("int64"), "model_name": Value("string")})
    message = List({"role": Value("string"), "content": Value("string")})
    return Features({**{k: Value("string") for k in ("id", "instruction", "reference", "better")},
                     "prompt": message, "completion": message})


def _card(title: str, configs: list[str], manifest: dict[str, Any]) -> str:
    import yaml

    from tpo_data.card import card_metadata

    header = card_metadata(configs)
    header["tags"] = ["pit", "self-improvement", "preference", "synthetic", "distilabel"]
    counts = ", ".join(f"{k}: {v}" for k, v in manifest["row_counts"].items())
    lines = [f"# {title}", "", f"- source: {manifest['source']}", f"- rows: {counts}"]
    lines += [f"- {k}: {manifest[k]}" for k in ("drops", "parent_model", "parent_version") if manifest.get(k)]
    return f"---\n{yaml.safe_dump(header, sort_keys=False)}---\n\n" + "\n".join(lines) + "\n"


def write_rows(args: PITPipelineArguments, recipe: dict[str, Any]) -> Path:
    """Build and store the improvement rows (``pit-sft-1``)."""
    from datasets import Dataset

    store = LocalStore(args.store)
    store.check_new(args.sft_version, "--sft_version")
    prefs, source = read_preferences(args)
    rows, drops = build_improvement_rows(prefs)
    if not rows:
        raise TPODataError(
            f"None of the {len(prefs)} preference rows from {source} gave an improvement row "
            f"(dropped: {drops}).",
            "Check the columns: prompt/chosen/rejected (TRL conversational or text), HH-RLHF style "
            "chosen/rejected text, or a TPO pairs version.",
        )
    train, test = split_rows(rows, args.holdout_size, args.split_seed)
    configs = {TRAIN: Dataset.from_list(train, features=_features(False)),
               TEST: Dataset.from_list(test, features=_features(False))}
    manifest = {"kind": "pit-sft", "source": source, "preference_rows": len(prefs), "drops": drops,
                "split_seed": args.split_seed, "recipe": recipe,
                "row_counts": {k: v.num_rows for k, v in configs.items()}}
    log.info("%d improvement rows (%d train, %d test) from %d preference rows; dropped %s",
             len(rows), len(train), len(test), len(prefs), drops)
    return store.write_version(args.sft_version, configs, manifest,
                               _card(f"PIT improvement rows {args.sft_version}", list(configs), manifest))


def _run_keeping_logging(pipeline: Any) -> Any:
    """Run a distilabel pipeline, then give the root logger its handlers back.

    distilabel replaces the root handlers with a queue handler whose queue it closes at
    the end of the run, so every later log call in this process would fail.
    """
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        # Not distilabel's cache: a run killed mid-batch would wait forever on resume (pipeline.py).
        return pipeline.run(use_cache=False)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def sample_references(args: PITPipelineArguments, engine: EngineArguments, sampling: SamplingArguments,
                      recipe: dict[str, Any]) -> Path:
    """Sample policy answers for every train instruction and store them (``pit-rl-refs-2``).

    distilabel runs the step in a forked worker: call this from a process that has not
    run torch yet (the script does), or the in-process engine can hang on torch's threads.
    """
    from datasets import Dataset
    from distilabel.pipeline import Pipeline
    from distilabel.steps import LoadDataFromDicts
    from distilabel.steps.tasks import TextGeneration

    from tpo_data.models import model_fingerprint, resolve_model
    from tpo_data.pipeline import start_endpoint

    store = LocalStore(args.store)
    store.check_new(args.refs_version, "--refs_version")
    train = store.load(args.sft_version, TRAIN)
    instructions = {r["instruction"]: r["id"] for r in train.to_list()}
    rows = [{"id": i, "instruction": x} for x, i in instructions.items()]
    model_path = str(resolve_model(engine.model))
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        base_url, served = start_endpoint(engine, model_path, sampling, out_dir, stack)
        llm = build_llm(engine, sampling, model_path, base_url, served)
        # distilabel's cache key leaves out the loaded rows and the model's weights: the name
        # carries both, or a rebuilt version (other split, retrained model) gets the old answers.
        digest = model_fingerprint(model_path, {"sampling": asdict(sampling), "rows": rows})
        with Pipeline(name=f"pit-refs-{args.refs_version}-{digest}",
                      cache_dir=out_dir / ".distilabel-cache") as pipeline:
            load = LoadDataFromDicts(name="load", data=rows, batch_size=args.input_batch_size)
            generate = TextGeneration(name="generate", llm=llm, num_generations=sampling.num_samples,
                                      group_generations=True, input_batch_size=args.input_batch_size)
            load >> generate
        distiset = _run_keeping_logging(pipeline)
    produced = list(distiset["default"]["train"]) if distiset else []
    strays = sorted({str(r.get("id")) for r in produced} - {r["id"] for r in rows})
    if strays:
        raise TPODataError(
            f"The pipeline returned answers for {len(strays)} instruction(s) not asked for "
            f"(first: {strays[0]}); they came from an old cache.",
            f"Delete {out_dir / '.distilabel-cache'} and rerun; nothing was written.",
        )
    refs, failed = [], 0
    for row in produced:
        for index, text in enumerate(row.get("generation") or []):
            if text and text.strip():
                refs.append({"id": f"{row['id']}-{index}", "instruction": row["instruction"],
                             "reference": text.strip(), "sample_index": index,
                             "model_name": str(row.get("model_name") or engine.model)})
            else:
                failed += 1
    if not refs:
        raise TPODataError(f"The engine returned no usable answer for {len(rows)} instructions.",
                           "Check the engine (for vLLM: its log in --output_dir) and rerun.")
    ds = Dataset.from_list(refs, features=_features(True))
    manifest = {"kind": "pit-rl-refs", "source": f"{args.store}/{args.sft_version}",
                "parent_version": args.sft_version, "parent_model": engine.model, "empty_or_failed": failed,
                "sampling": asdict(sampling), "recipe": recipe, "row_counts": {TRAIN: ds.num_rows}}
    log.info("%d references from %s for %d instructions (%d empty or failed)",
             len(refs), engine.model, len(rows), failed)
    return store.write_version(args.refs_version, {TRAIN: ds}, manifest,
                               _card(f"PIT round-2 references {args.refs_version}", [TRAIN], manifest))


def main(argv: list[str] | None = None) -> list[Path]:
    """``pipelines/pit.py [--config recipe.yaml] [--key value ...]``: section ``pipeline:`` of the recipe."""
    from tpo_data.pit_training import parse_stage

    args, engine, sampling = parse_stage(
        "pipeline", (PITPipelineArguments, EngineArguments, SamplingArguments), argv, prog="pipelines/pit.py")
    recipe = {**asdict(args), **asdict(engine), **asdict(sampling)}
    written = []
    if args.stage in ("rows", "all"):
        written.append(write_rows(args, recipe))
    if args.stage in ("refs", "all"):
        written.append(sample_references(args, engine, sampling, recipe))
    for folder in written:
        print(f"Dataset version: {folder}")
    return written

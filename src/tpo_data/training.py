"""Train M_t from M_{t-1} with DPO on one iteration's pairs (METHOD.md 1.7), with TRL's DPOTrainer.

``trainers/dpo.py`` (and ``tpo-data train``) parse three dataclasses with
``trl.TrlParser``: :class:`TrainArguments` (where the data and the parent model
come from), ``trl.DPOConfig`` and ``trl.ModelConfig``, so a YAML recipe
(``--config``) and every DPOConfig option work as in TRL's own scripts.

Data: the ``pairs`` config of a local store version (``--dataset_store`` +
``--dataset_version``) or of a tagged Hub revision (``--dataset_repo`` +
``--dataset_revision``). Held-out pairs for the eval loss (and best-checkpoint
selection) come from another version (``--eval_version``) or a seeded fraction
of the training pairs (``--eval_split``). The paper picks its best checkpoint by
judged win rate on held-out prompts; the DPO loss on held-out pairs is our
cheaper stand-in for that choice.

Defaults that differ from TRL's: the parent model is the one named in the
dataset's manifest; reference log-probs are precomputed once (the reference
forward pass then runs once per pair instead of once per pair per epoch, and no
reference model stays in memory); without CUDA, training runs on the CPU in
fp32 without gradient checkpointing; logs go to trackio (local files) when it
is installed. ``--irpo_alpha A`` adds the NLL term of IRPO (DPO + A * NLL on
the chosen completion) through TRL's loss list.

Output (``--output_dir``): the model and tokenizer, ``README.md`` (a model card
naming the dataset version, the parent model, the settings and the final
metrics), ``lineage.json``, ``train_results.json``/``eval_results.json`` and
``trainer_state.json``. Only the main process writes these files, so the same
command works under ``accelerate launch``. With ``--use_peft`` (LoRA, needs
``peft``) the adapter goes to ``<output_dir>/adapter`` and ``<output_dir>``
holds the adapter merged into the parent: the next iteration's engine, the
evaluation and the next DPO run load M_t as a full model.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tpo_data import hub
from tpo_data.errors import TPODataError
from tpo_data.files import write_text_atomic
from tpo_data.models import EMBEDDED, EMBEDDED_HUB_ID, resolve_model
from tpo_data.secrets import scrub
from tpo_data.store import library_versions

if TYPE_CHECKING:
    import datasets
    from trl import DPOConfig, ModelConfig, TrlParser

log = logging.getLogger(__name__)

PAIRS = "pairs"
REQUIRED_COLUMNS = ("prompt", "chosen", "rejected")
LINEAGE = "lineage.json"
# What a run in an output_dir trains on, written when it starts: a resume must train on the same.
RESUME_DATA = "training_data.json"
CARD = "README.md"
ADAPTER = "adapter"


def trained_at(model_path: str | Path) -> str | None:
    """When tpo-data finished training the model folder (its lineage's ``created``), else None.

    Generation ledgers record it: a model retrained at the same path is another model.
    """
    path = Path(model_path) / LINEAGE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text("utf-8"))["created"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise TPODataError(
            f"{path} is unreadable ({type(err).__name__}).",
            f"Restore it, or retrain that model: remove {path.parent} and rerun the same command.",
        ) from None


@dataclass
class TrainArguments:
    """Where the pairs and the parent model come from (the rest is ``trl.DPOConfig``)."""

    dataset_store: str | None = field(
        default=None,
        metadata={"help": "Local store folder holding the dataset versions (for example "
                  "outputs/tpo-smollm2/store). Use with --dataset_version."},
    )
    dataset_version: str | None = field(
        default=None, metadata={"help": "Version in --dataset_store to train on, for example iter-2."}
    )
    dataset_repo: str | None = field(
        default=None,
        metadata={"help": "Hub dataset repo (user/name) to train on instead of a local store. "
                  "Use with --dataset_revision."},
    )
    dataset_revision: str | None = field(
        default=None, metadata={"help": "Tag, branch or commit of --dataset_repo, for example iter-2."}
    )
    model: str | None = field(
        default=None,
        metadata={"help": "Model to train: a local folder, 'embedded' (SmolLM2-135M-Instruct) or a Hub "
                  "id in the local cache. Default: the parent model named in the dataset's manifest. "
                  "--model_name_or_path is accepted as well."},
    )
    eval_version: str | None = field(
        default=None,
        metadata={"help": "Version (store) or revision (Hub) whose pairs are held out for the eval "
                  "loss and best-checkpoint selection."},
    )
    eval_split: float = field(
        default=0.0,
        metadata={"help": "Fraction of the training pairs held out for the eval loss instead of "
                  "--eval_version (split with --seed). 0 disables it."},
    )
    irpo_alpha: float = field(
        default=0.0,
        metadata={"help": "Weight of the NLL term on chosen completions (DPO+NLL, IRPO). Maps to "
                  "loss_type=[..., 'sft'] and loss_weights=[..., irpo_alpha]. 0 disables it."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Train into a non-empty --output_dir: old checkpoint-* folders are deleted "
                  "and the model files are replaced."},
    )


@dataclass
class DataSource:
    """One resolved dataset version: its description for the card and lineage, and its manifest."""

    lineage: dict[str, Any]
    label: str
    manifest: dict[str, Any]


def trackio_available() -> bool:
    return importlib.util.find_spec("trackio") is not None


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def make_parser(prog: str | None = None) -> TrlParser:
    """TrlParser over (TrainArguments, DPOConfig, ModelConfig) with tpo-data's defaults.

    The defaults are set on the parser, so a recipe (``--config``) and the command
    line still override every one of them.
    """
    from trl import DPOConfig, ModelConfig

    from tpo_data.cli import recipe_parser

    parser = recipe_parser((TrainArguments, DPOConfig, ModelConfig), prog)
    defaults: dict[str, Any] = {
        "precompute_ref_log_probs": True,
        "report_to": "trackio" if trackio_available() else "none",
        "project": "tpo-data",
    }
    if not cuda_available():
        # DPOConfig defaults to bf16 and refuses it without a GPU; gradient
        # checkpointing only trades speed for memory, which a CPU run has plenty of.
        defaults.update(use_cpu=True, bf16=False, gradient_checkpointing=False)
    parser.set_defaults(**defaults)
    return parser


def parse_args(argv: Sequence[str] | None = None,
               prog: str | None = None) -> tuple[TrainArguments, DPOConfig, ModelConfig]:
    from tpo_data.cli import parse_recipe

    script_args, training_args, model_args = parse_recipe(make_parser(prog), None if argv is None else list(argv))
    return script_args, training_args, model_args


# -- data ---------------------------------------------------------------------------------


def _check_source(args: TrainArguments) -> str:
    local = args.dataset_store is not None or args.dataset_version is not None
    hub = args.dataset_repo is not None or args.dataset_revision is not None
    if local and hub:
        raise TPODataError(
            "both a local store (--dataset_store/--dataset_version) and a Hub repo "
            "(--dataset_repo/--dataset_revision) were given",
            "train on one of them: drop either the --dataset_store/--dataset_version pair "
            "or the --dataset_repo/--dataset_revision pair",
        )
    if local and (args.dataset_store is None or args.dataset_version is None):
        raise TPODataError(
            "a local dataset needs both --dataset_store and --dataset_version",
            "pass both, for example --dataset_store outputs/tpo-smollm2/store "
            "--dataset_version iter-1 (`tpo-data versions --store PATH` lists the versions)",
        )
    if hub and (args.dataset_repo is None or args.dataset_revision is None):
        raise TPODataError(
            "a Hub dataset needs both --dataset_repo and --dataset_revision",
            "pass both, for example --dataset_repo user/tpo-pairs --dataset_revision iter-1 "
            "(`tpo-data versions --repo ID` lists the published versions)",
        )
    if not (local or hub):
        raise TPODataError(
            "no dataset given",
            "pass --dataset_store PATH --dataset_version iter-N (a local store) or "
            "--dataset_repo ID --dataset_revision iter-N (a Hub dataset repo)",
        )
    return "store" if local else "hub"


def _store_source(root: str, version: str) -> DataSource:
    from tpo_data.store import LocalStore

    store = LocalStore(root)
    manifest = store.manifest(version)  # raises, listing the existing versions, if missing
    return DataSource(
        lineage={
            "source": "store",
            "store": str(Path(root).resolve()),
            "version": version,
            "manifest_sha256": store.manifest_sha256(version),
        },
        label=f"{version} of local store {Path(root).resolve()}",
        manifest=manifest,
    )


def _hub_tags(repo: str) -> str:
    from huggingface_hub import HfApi

    try:
        refs = HfApi().list_repo_refs(repo, repo_type="dataset")
    except Exception as err:  # the repo may be missing or unreachable: the listing is a courtesy
        return f"could not list them: {type(err).__name__}"
    return ", ".join(sorted(tag.name for tag in refs.tags)) or "none"


def _hub_source(repo: str, revision: str) -> DataSource:
    from tpo_data.hub import NoManifestError, hub_manifest

    try:
        manifest = hub_manifest(repo, revision)
    except NoManifestError:
        raise TPODataError(
            f"{repo}@{revision} is not a tpo-data dataset version "
            f"(tags in {repo}: {_hub_tags(repo)})",
            "pass one of the tags as --dataset_revision, or check --dataset_repo "
            f"(`tpo-data versions --repo {repo}`)",
        ) from None
    commit = manifest["commit"]
    return DataSource(
        lineage={
            "source": "hub",
            "repo": repo,
            "revision": revision,
            "commit": commit,
            "manifest_sha256": manifest.get("manifest_sha256"),
        },
        label=f"{repo}@{revision} (commit {commit})",
        manifest=manifest,
    )


def _load_pairs(kind: str, args: TrainArguments, version: str, source: DataSource) -> datasets.Dataset:
    from tpo_data.store import LocalStore

    if kind == "store":
        return LocalStore(args.dataset_store).load(version, PAIRS)
    import datasets

    # The commit the lineage records, not the name: a branch that moves meanwhile must not
    # give other pairs than the ones recorded.
    return datasets.load_dataset(args.dataset_repo, PAIRS, revision=source.lineage["commit"], split="train")


def _no_pairs(label: str) -> TPODataError:
    return TPODataError(
        f"{label} has no pairs",
        "every instruction of that iteration tied or failed to parse; generate the "
        "iteration again with more samples (--num_samples) or other instructions",
    )


def _read_pairs(kind: str, args: TrainArguments, version: str, source: DataSource) -> datasets.Dataset:
    # datasets refuses to load an empty split, so an empty version is caught on its manifest.
    if source.manifest.get("row_counts", {}).get(PAIRS) == 0:
        raise _no_pairs(source.label)
    return _check_pairs(_load_pairs(kind, args, version, source), source.label)


def _check_pairs(ds: datasets.Dataset, label: str) -> datasets.Dataset:
    missing = [c for c in REQUIRED_COLUMNS if c not in ds.column_names]
    if missing:
        raise TPODataError(
            f"the pairs of {label} lack the column(s) {', '.join(missing)} "
            f"(found: {', '.join(ds.column_names)})",
            "train on a `pairs` config written by tpo-data (docs/SCHEMA.md), or add "
            "prompt/chosen/rejected columns in TRL's preference format",
        )
    if ds.num_rows == 0:
        raise _no_pairs(label)
    # The side columns (scores, thoughts, ...) are for people, not for the trainer.
    return ds.select_columns(list(REQUIRED_COLUMNS))


def load_data(
    args: TrainArguments, seed: int
) -> tuple[DataSource, datasets.Dataset, datasets.Dataset | None, dict[str, Any] | None]:
    """The training source, train pairs, held-out pairs (or None) and the held-out lineage."""
    from accelerate import PartialState

    kind = _check_source(args)
    if args.eval_version is not None and args.eval_split:
        raise TPODataError(
            "both --eval_version and --eval_split were given",
            "hold out pairs one way: another version (--eval_version) or a fraction (--eval_split)",
        )
    if not 0.0 <= args.eval_split < 1.0:
        raise TPODataError(
            f"--eval_split must be in [0, 1), got {args.eval_split}",
            "pass a fraction such as 0.1, or 0 to hold out nothing",
        )
    version = args.dataset_version if kind == "store" else args.dataset_revision
    # One process downloads and caches; the others then read the cache.
    with PartialState().main_process_first():
        if kind == "store":
            source = _store_source(args.dataset_store, version)
        else:
            source = _hub_source(args.dataset_repo, version)
        train = _read_pairs(kind, args, version, source)
        eval_ds, eval_lineage = None, None
        if args.eval_version is not None:
            held = _store_source(args.dataset_store, args.eval_version) if kind == "store" else (
                _hub_source(args.dataset_repo, args.eval_version))
            eval_ds = _read_pairs(kind, args, args.eval_version, held)
            eval_lineage = held.lineage
    if args.eval_split:
        n_eval = max(1, round(train.num_rows * args.eval_split))
        if n_eval >= train.num_rows:
            raise TPODataError(
                f"--eval_split {args.eval_split} leaves no training pairs out of {train.num_rows}",
                "lower --eval_split, or hold out another version with --eval_version",
            )
        split = train.train_test_split(test_size=n_eval, seed=seed)
        train, eval_ds = split["train"], split["test"]
        eval_lineage = {"split_of_training_data": args.eval_split, "seed": seed, "rows": n_eval}
    return source, train, eval_ds, eval_lineage


# -- settings -----------------------------------------------------------------------------


def resolve_parent(args: TrainArguments, model_args: ModelConfig, manifest: dict[str, Any]) -> str:
    """The model name as given (command line, else the manifest's parent model)."""
    given = {n for n in (args.model, model_args.model_name_or_path) if n is not None}
    if len(given) > 1:
        raise TPODataError(
            f"--model {args.model} and --model_name_or_path {model_args.model_name_or_path} disagree",
            "pass only one of them",
        )
    name = given.pop() if given else manifest.get("parent_model")
    if not name:
        raise TPODataError(
            "no model given and the dataset's manifest names no parent model",
            "pass --model PATH (or --model embedded)",
        )
    return str(name)


def apply_irpo(args: TrainArguments, training_args: DPOConfig) -> None:
    """Add IRPO's NLL term (weight ``irpo_alpha``) to the DPO loss list."""
    if args.irpo_alpha < 0:
        raise TPODataError(f"--irpo_alpha must be >= 0, got {args.irpo_alpha}",
                           "pass 0 (plain DPO) or a positive weight such as 1.0")
    if not args.irpo_alpha:
        return
    if "sft" in training_args.loss_type:
        raise TPODataError(
            f"irpo_alpha is {args.irpo_alpha} (the recipe's value, if you did not pass --irpo_alpha) and "
            "loss_type already contains 'sft': the NLL weight would be set twice",
            "set it one way: pass --irpo_alpha 0 to weight 'sft' through --loss_weights, or drop 'sft' "
            "from --loss_type",
        )
    weights = list(training_args.loss_weights or [1.0] * len(training_args.loss_type))
    training_args.loss_type = [*training_args.loss_type, "sft"]
    training_args.loss_weights = [*weights, args.irpo_alpha]


def check_output_dir(args: TrainArguments, training_args: DPOConfig) -> None:
    """Refuse a non-empty output_dir unless resuming or told to overwrite (then drop old checkpoints)."""
    from accelerate import PartialState

    state = PartialState()
    out = Path(training_args.output_dir)
    occupied = out.is_dir() and any(out.iterdir()) and not training_args.resume_from_checkpoint
    state.wait_for_everyone()  # every process looks before the main one deletes anything
    if occupied and not args.overwrite_output_dir:
        raise TPODataError(
            f"output directory {out} exists and is not empty",
            "pass another --output_dir, add --overwrite_output_dir to replace its model, or "
            "--resume_from_checkpoint to continue a run saved there",
        )
    if occupied and state.is_main_process:
        # Stale checkpoints would be rotated, resumed or reported as this run's best; a stale
        # adapter would sit beside a model it was not trained for; a stale lineage.json would
        # mark the folder finished (to the loop) if this run fails.
        for old in [*out.glob("checkpoint-*"), out / ADAPTER]:
            if old.is_dir():
                shutil.rmtree(old)
        (out / LINEAGE).unlink(missing_ok=True)
    state.wait_for_everyone()


def check_prompt_room(train_ds: datasets.Dataset, model_path: Path | str, training_args: DPOConfig,
                      label: str) -> None:
    """Refuse before loading anything when every prompt alone fills max_length: TRL drops such
    pairs (keep_start truncation leaves them no completion token), and with the reference
    log-probs precomputed an empty dataset fails inside DPOTrainer with a bare torch error."""
    if training_args.max_length is None or training_args.truncation_mode != "keep_start":
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_path))

    def prompt_tokens(prompt: list[dict[str, str]] | str) -> int:
        ids = (tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else
               tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True))
        return len(ids["input_ids"] if hasattr(ids, "keys") else ids)

    if all(prompt_tokens(p) >= training_args.max_length for p in train_ds["prompt"]):
        raise TPODataError(
            f"every prompt of {label} is at least max_length={training_args.max_length} "
            "tokens long, so no completion token is left to train on",
            "raise --max_length",
        )


def check_resume_data(training_args: DPOConfig, data: dict[str, Any]) -> None:
    """Resume only on the data the run started on (recorded in output_dir's RESUME_DATA by
    :func:`record_resume_data`). A checkpoint trained on one version and finished on another
    would carry a lineage naming only the second."""
    path = Path(training_args.output_dir) / RESUME_DATA
    if training_args.resume_from_checkpoint and path.is_file():
        recorded = json.loads(path.read_text("utf-8"))
        differ = sorted(k for k in recorded.keys() | data.keys() if recorded.get(k) != data.get(k))
        if differ:
            raise TPODataError(
                f"{training_args.resume_from_checkpoint} belongs to a run on other data or another parent "
                "model: " + "; ".join(f"{k} was {recorded.get(k)!r}, now {data.get(k)!r}" for k in differ),
                "resume with the data and --model it started with, or start again with "
                "--overwrite_output_dir true (without --resume_from_checkpoint)",
            )


def record_resume_data(training_args: DPOConfig, data: dict[str, Any]) -> None:
    """A new run records what it trains on, once everything before training has passed (a run
    refused earlier leaves output_dir as it found it)."""
    from accelerate import PartialState

    if not training_args.resume_from_checkpoint and PartialState().is_main_process:
        write_text_atomic(Path(training_args.output_dir) / RESUME_DATA, json.dumps(data, indent=1) + "\n")


def check_peft(model_args: ModelConfig) -> None:
    if model_args.use_peft and importlib.util.find_spec("peft") is None:
        raise TPODataError(
            "--use_peft needs the peft library, which is not installed",
            "pip install 'tpo-data[peft]' (or pip install peft), or drop --use_peft",
        )
    quantized = model_args.load_in_4bit or model_args.load_in_8bit
    if quantized and importlib.util.find_spec("bitsandbytes") is None:
        flag = "--load_in_4bit" if model_args.load_in_4bit else "--load_in_8bit"
        raise TPODataError(
            f"{flag} (QLoRA) needs the bitsandbytes library, which is not installed",
            f"pip install bitsandbytes (on a machine with a GPU it supports), or drop {flag}",
        )


def check_mergeable(model_args: ModelConfig, model_path: Path | str) -> None:
    """A LoRA run's adapter is merged into the parent's weights, which must not be stored quantized."""
    config = Path(model_path) / "config.json"
    if model_args.use_peft and config.is_file() and "quantization_config" in json.loads(config.read_text("utf-8")):
        raise TPODataError(
            f"{model_path} is stored quantized, so the LoRA adapter could not be merged into "
            "full-precision weights to make M_t",
            "train from the unquantized parent and pass --load_in_4bit (QLoRA) instead",
        )


def merge_adapter(parent: str, adapter: str, out: str, revision: str | None, dtype: str | None) -> None:
    """Save the parent with the LoRA adapter merged in, and the adapter's tokenizer, to ``out``.

    Runs in a child process (:func:`merge_in_child`): the parent is loaded afresh, unquantized.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(parent, revision=revision, dtype=dtype or "auto")
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    merged.save_pretrained(out)
    AutoTokenizer.from_pretrained(adapter).save_pretrained(out)


def merge_in_child(parent: Path | str, adapter: Path, out: Path, model_args: ModelConfig) -> None:
    """:func:`merge_adapter` in a fresh interpreter: a plain single-process load there, whatever
    DeepSpeed ZeRO-3 or FSDP state this one holds (under ZeRO-3 an in-process load would be
    partitioned across processes that are no longer listening)."""
    import multiprocessing

    child = multiprocessing.get_context("spawn").Process(
        target=merge_adapter,
        args=(str(parent), str(adapter), str(out), model_args.model_revision, model_args.dtype),
    )
    child.start()
    child.join()
    if child.exitcode != 0:
        raise TPODataError(
            f"merging the LoRA adapter into {parent} failed (exit status {child.exitcode}, error above); "
            f"the trained adapter is saved in {adapter}",
            "fix the cause (the merge loads the parent on the CPU at --dtype) and rerun with "
            "--overwrite_output_dir, or merge the adapter yourself with peft's merge_and_unload",
        )


def check_saved(folder: Path, adapter: bool) -> None:
    """The trainer wrote loadable weights (a DeepSpeed setting can make it write a raw checkpoint)."""
    wanted = ("adapter_config.json",) if adapter else ("config.json",)
    weights = any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))
    if not (weights and all((folder / name).is_file() for name in wanted)):
        raise TPODataError(
            f"the trainer saved no loadable {'adapter' if adapter else 'model'} in {folder}",
            "with DeepSpeed ZeRO-3 set stage3_gather_16bit_weights_on_model_save: true in its config, "
            "then rerun with --resume_from_checkpoint or --overwrite_output_dir",
        )


def check_eval_settings(training_args: DPOConfig, has_eval: bool) -> None:
    if has_eval or training_args.eval_strategy == "no":
        return
    raise TPODataError(
        f"eval_strategy is {training_args.eval_strategy.value!r} but no pairs are held out",
        "pass --eval_split 0.1 or --eval_version VERSION, or --eval_strategy no "
        "--load_best_model_at_end false",
    )


# -- outputs ------------------------------------------------------------------------------


_SETTINGS = (
    "num_train_epochs", "max_steps", "learning_rate", "lr_scheduler_type", "warmup_steps",
    "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "beta",
    "loss_type", "loss_weights", "precompute_ref_log_probs", "seed", "bf16",
    "gradient_checkpointing", "eval_strategy", "load_best_model_at_end",
    "metric_for_best_model",
)


def _adapter_settings(model_args: ModelConfig) -> dict[str, Any] | None:
    """LoRA settings of a --use_peft run (its merged model's recipe), else None."""
    if not model_args.use_peft:
        return None
    return {"folder": ADAPTER, "merged": True, "r": model_args.lora_r, "alpha": model_args.lora_alpha,
            "dropout": model_args.lora_dropout, "target_modules": model_args.lora_target_modules,
            "modules_to_save": model_args.lora_modules_to_save, "use_dora": model_args.use_dora,
            "use_rslora": model_args.use_rslora, "load_in_4bit": model_args.load_in_4bit,
            "load_in_8bit": model_args.load_in_8bit, "dtype": model_args.dtype}


def training_settings(training_args: DPOConfig, world_size: int) -> dict[str, Any]:
    settings = {}
    for name in _SETTINGS:
        value = getattr(training_args, name)
        settings[name] = getattr(value, "value", value)  # enums as their names
    settings["world_size"] = world_size
    settings["effective_batch_size"] = (
        training_args.per_device_train_batch_size
        * training_args.gradient_accumulation_steps
        * world_size
    )
    return settings


def build_card(lineage: dict[str, Any], label: str) -> str:
    """A model card: YAML front matter, then lineage, settings and metrics as tables."""
    import yaml

    header: dict[str, Any] = {
        "library_name": "transformers",
        "tags": ["trl", "dpo", "tpo", "tpo-data"],
    }
    parent = lineage["parent_model"]
    # base_model must be a Hub id; local folders are named in the text only.
    hub_id = EMBEDDED_HUB_ID if parent == EMBEDDED else parent
    if hub_id.count("/") == 1 and not Path(hub_id).exists():
        header["base_model"] = hub_id
    if lineage["dataset"]["source"] == "hub":
        header["datasets"] = [lineage["dataset"]["repo"]]

    def table(rows: dict[str, Any]) -> str:
        lines = ["| | |", "|---|---|"]
        for key, value in rows.items():
            shown = json.dumps(value) if isinstance(value, (list, dict)) else value
            lines.append(f"| {key} | {shown} |")
        return "\n".join(lines)

    metrics = {k: round(v, 6) if isinstance(v, float) else v for k, v in lineage["metrics"].items()}
    eval_text = (
        "Held-out pairs: none." if lineage["eval"] is None
        else f"Held-out pairs: `{json.dumps(lineage['eval'])}`."
    )
    best = lineage.get("best_checkpoint")
    return "\n".join([
        "---",
        yaml.safe_dump(header, sort_keys=False).strip(),
        "---",
        "",
        f"# {Path(lineage['output_dir']).name}",
        "",
        f"TPO iteration {lineage['iteration']} model (Thought Preference Optimization, "
        "arXiv 2410.10630): the parent model trained with DPO on the thought-and-response "
        "preference pairs of one dataset version, with tpo-data and TRL's `DPOTrainer`.",
        "",
        "## Lineage",
        "",
        table({
            "dataset version": label,
            "dataset config": PAIRS,
            "training pairs": lineage["train_rows"],
            "parent model": parent,
            "iteration": lineage["iteration"],
            "best checkpoint": best or "last step",
            **({"LoRA adapter": f"`{adapter['folder']}/` (r={adapter['r']}, alpha={adapter['alpha']}), "
                "merged into this model"} if (adapter := lineage.get("adapter")) else {}),
        }),
        "",
        eval_text,
        "",
        "## Training settings",
        "",
        table(lineage["training"]),
        "",
        "## Final metrics",
        "",
        table(metrics),
        "",
        "## Reproduce",
        "",
        "`lineage.json` holds the same facts in machine-readable form; the dataset version's "
        "manifest (sha256 in `lineage.json`) pins the data byte for byte.",
        "",
        "Library versions: "
        + ", ".join(f"{k} {v}" for k, v in lineage["library_versions"].items()),
        "",
    ])


def _final_metrics(
    train_metrics: dict[str, Any], eval_metrics: dict[str, Any], log_history: list[dict[str, Any]]
) -> dict[str, Any]:
    # DPOTrainer adds its reward metrics to the logs only, not to evaluate()'s result.
    last_eval = next((e for e in reversed(log_history) if "eval_loss" in e), {}) if eval_metrics else {}
    reward_metrics = {k: v for k, v in last_eval.items() if k.startswith("eval_rewards/")}
    metrics = {k: v for k, v in {**train_metrics, **eval_metrics, **reward_metrics}.items()
               if isinstance(v, (int, float))}
    for key, value in metrics.items():
        if isinstance(value, float) and not math.isfinite(value):
            log.warning("final metric %s is %s", key, value)
    return metrics


# -- entry points -------------------------------------------------------------------------


def train(script_args: TrainArguments, training_args: DPOConfig, model_args: ModelConfig) -> Path:
    """Train and save the model, card and lineage to ``training_args.output_dir``; return it."""
    out = _train(script_args, training_args, model_args)
    end_process_group()
    return out


def end_process_group() -> None:
    """Destroy the distributed process group, once the trainer is gone.

    Not ``Trainer.end()``: it destroys the group while the trainer still holds the DDP-wrapped
    model, and a DDP reducer freed after its gloo group hangs or aborts its process at exit
    (torch 2.13 on CPU: about one torchrun test in 40 hung after training). So collect first.
    """
    from accelerate import PartialState

    gc.collect()
    PartialState().destroy_process_group()


def _train(script_args: TrainArguments, training_args: DPOConfig, model_args: ModelConfig) -> Path:
    from accelerate import PartialState
    from trl import DPOTrainer, get_peft_config, get_quantization_config

    state = PartialState()
    if state.is_main_process and not training_args.report_to and not trackio_available():
        print("note: training logs go to the console only (trackio is not installed; "
              "`pip install trackio` for local dashboards, or pick --report_to)")
    apply_irpo(script_args, training_args)
    check_peft(model_args)
    push = hub.take_model_push(training_args, state.is_main_process)  # published by us once lineage and card exist
    check_output_dir(script_args, training_args)
    source, train_ds, eval_ds, eval_lineage = load_data(script_args, training_args.seed)
    check_eval_settings(training_args, eval_ds is not None)
    parent = resolve_parent(script_args, model_args, source.manifest)
    # Not the store's path: a moved store holds the same data (its manifest sha says so).
    resume_data = {**{k: v for k, v in source.lineage.items() if k != "store"}, "parent_model": parent}
    check_resume_data(training_args, resume_data)
    with state.main_process_first():  # "embedded" is converted once, by one process
        model_path = resolve_model(parent)
    check_mergeable(model_args, model_path)

    model_init_kwargs = {
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }
    training_args.model_init_kwargs = model_init_kwargs
    check_prompt_room(train_ds, model_path, training_args, source.label)
    setup_start = time.perf_counter()
    trainer = DPOTrainer(
        model=str(model_path),
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        quantization_config=get_quantization_config(model_args),  # --load_in_4bit/8bit, as TRL's dpo.py
        peft_config=get_peft_config(model_args),
    )
    # Model loading, tokenization and the reference precompute all happen before train_runtime starts.
    setup_runtime = time.perf_counter() - setup_start
    trained_rows = len(trainer.train_dataset)
    if trained_rows < train_ds.num_rows and state.is_main_process:
        log.warning("%d of %d pairs dropped: their prompt alone fills max_length=%d",
                    train_ds.num_rows - trained_rows, train_ds.num_rows, training_args.max_length)
    record_resume_data(training_args, resume_data)
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    eval_metrics: dict[str, Any] = {}
    if eval_ds is not None:
        # After load_best_model_at_end this scores the checkpoint that was kept.
        eval_metrics = trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
    trainer.save_state()
    out = Path(training_args.output_dir)
    if trainer.is_fsdp_enabled:
        # save_model writes nothing from sharded state dicts (FSDP2's default): gather a full one.
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    saved = out / ADAPTER if model_args.use_peft else out
    trainer.save_model(str(saved))  # gathers sharded weights, so every process calls it
    # The main process goes on alone: the others would wait for a long merge in a barrier that times out.
    trainer.accelerator.wait_for_everyone()

    if trainer.accelerator.is_main_process:
        check_saved(saved, adapter=model_args.use_peft)
        if model_args.use_peft:
            merge_in_child(model_path, saved, out, model_args)
        best = trainer.state.best_model_checkpoint
        lineage = {
            "dataset": {**source.lineage, "config": PAIRS},
            "parent_model": parent,
            "parent_model_path": str(model_path),
            "iteration": source.manifest.get("iteration"),
            "eval": eval_lineage,
            "train_rows": trained_rows,
            "adapter": _adapter_settings(model_args),
            "best_checkpoint": Path(best).name if best else None,
            "training": training_settings(training_args, trainer.accelerator.num_processes),
            "metrics": {"setup_runtime": round(setup_runtime, 3),
                        **_final_metrics(result.metrics, eval_metrics, trainer.state.log_history)},
            "output_dir": str(out.resolve()),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "library_versions": library_versions(),
        }
        # Atomic: the loop takes a model folder with lineage.json as finished.
        write_text_atomic(out / LINEAGE, scrub(json.dumps(lineage, indent=2, default=str)) + "\n")
        (out / CARD).write_text(scrub(build_card(lineage, source.label)), encoding="utf-8")
        trainer.accelerator.print(f"model saved to {out} (card: {out / CARD})")
        if push:
            commit = push.publish(out)
            trainer.accelerator.print(f"published to the Hub: {push.repo_id} (commit {commit})")
    return out


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> Path:
    """Parse ``argv`` (default: sys.argv) like trainers/dpo.py and train."""
    return train(*parse_args(argv, prog))

"""PIT training stages behind ``trainers/pit.py`` (METHOD.md 2.1-2.4).

- ``sft``: ``trl.SFTTrainer`` on the improvement rows of a store version
  (default ``pit-sft-1``): prompt = improvement prompt with x and y_ref = y_l,
  completion = y_w, in TRL's conversational prompt-completion format, so the loss
  is -log M_PIT(y_w | x, y_l) on the completion only.
- ``reward``: the gap reward model R(x, y1, y2), a one-logit
  ``AutoModelForSequenceClassification`` over :func:`tpo_data.pit.gap_text`. Each
  (x, y_w, y_l) gives four inputs scored in one forward pass and
  :func:`tpo_data.pit.gap_ranking_loss` over them (:class:`GapRewardTrainer`).
- ``rl``: ``trl.RLOOTrainer`` maximizing R(x, y, y_ref) - beta * KL(policy || reference).

Why RLOO rather than GRPO: PIT's objective is a reward with a KL penalty to the SFT
model (PPO in the paper). TRL 1.16's RLOO subtracts ``beta * KL`` of the whole sequence
from the reward, which is that objective, and it loads the KL reference by default
(``beta`` 0.05); GRPO's default is no KL at all (``beta`` 0.0) and, when enabled, adds
it to the loss instead. Both accept a custom reward function that receives the dataset's
extra columns (here ``instruction`` and ``reference``) and both run on CPU; RLOO needs
only 2 generations per prompt for its leave-one-out baseline, cheap on CPU.

Curriculum (METHOD.md 2.4), ``--round``: round 1 trains on y_ref from the preference
data (the rejected answer of the ``pit-sft-1`` rows); round 2 on y_ref sampled from the
policy (version ``pit-rl-refs-2`` written by ``pipelines/pit.py``), starting from the
round-1 checkpoint. ``--kl_reference`` keeps the KL anchored to the SFT model in round 2
(RLOO builds its reference model from the policy's ``config._name_or_path``).

Recipes have one section per stage (``sft:``, ``reward:``, ``rl:``) plus shared
top-level keys; :func:`parse_stage` merges them and applies command-line overrides.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from tpo_data import hub
from tpo_data.errors import TPODataError
from tpo_data.pit import gap_inputs, gap_ranking_loss, gap_text, improvement_messages
from tpo_data.training import check_saved, end_process_group

log = logging.getLogger("tpo_data")

SFT_VERSION = "pit-sft-1"
REFS_VERSION = "pit-rl-refs-2"
TRAIN, TEST = "train", "test"
# Written next to a trained gap reward model; the file tells it apart from a point-wise RM.
GAP_MARKER = "pit_gap_reward.json"
# Written next to an RL policy: which curriculum round made it (round 2 must start from round 1).
RL_MARKER = "pit_rl.json"
STAGES = ("sft", "reward", "rl")
RECIPE_SECTIONS = ("pipeline", *STAGES)


# --- arguments -------------------------------------------------------------------------


@dataclass
class PITDataArguments:
    """Where the training rows come from."""

    store: str = field(default="outputs/pit/store", metadata={"help": "Local dataset store folder."})
    version: str = field(
        default=SFT_VERSION, metadata={"help": "Store version with the improvement rows (config 'train')."}
    )
    max_examples: int | None = field(default=None, metadata={"help": "Use at most this many rows."})


def _train_layers_field() -> Any:
    return field(default=0, metadata={
        "help": "Train only the last N decoder layers and the final norm (and a reward head); 0 trains "
                "everything. Cuts the backward pass on a CPU; the paper trains all weights."})


@dataclass
class SFTStageArguments:
    model: str = field(default="embedded", metadata={"help": "Model to fine-tune: 'embedded', a folder or a Hub id."})
    train_layers: int = _train_layers_field()


@dataclass
class RewardStageArguments:
    model: str = field(
        default="embedded",
        metadata={"help": "Backbone of the gap reward model (a causal LM or sequence-classification folder)."},
    )
    max_length: int = field(
        default=1024, metadata={"help": "Tokens per (x, y1, y2) text; longer ones lose their start."}
    )
    train_layers: int = _train_layers_field()


@dataclass
class RLStageArguments:
    model: str = field(default="outputs/pit/sft", metadata={"help": "Policy to start from (round 1: the SFT model)."})
    reward_model: str = field(default="outputs/pit/reward", metadata={"help": "Gap reward model folder."})
    round: int = field(
        default=1, metadata={"help": "Curriculum round: 1 (y_ref from the data) or 2 (y_ref from the policy)."}
    )
    refs_version: str = field(
        default=REFS_VERSION, metadata={"help": "Round 2: store version with policy-sampled references."}
    )
    kl_reference: str | None = field(
        default=None,
        metadata={"help": "Model the KL penalty is measured against (default: --model). Round 2: the SFT model."},
    )
    reward_batch_size: int = field(default=8, metadata={"help": "Gap reward model batch size."})
    reward_max_length: int | None = field(
        default=None, metadata={"help": "Gap reward model max tokens (default: what it was trained with)."}
    )
    train_layers: int = _train_layers_field()

    def __post_init__(self) -> None:
        if self.round not in (1, 2):
            raise TPODataError(f"--round must be 1 or 2 (got {self.round}).",
                               "Run round 1 first, then round 2 from its checkpoint (METHOD.md 2.4).")


def recipe_section(data: dict[str, Any], section: str, path: str | Path) -> dict[str, Any]:
    """The recipe's ``section:`` mapping ({} when absent or empty)."""
    own = data.get(section) or {}
    if not isinstance(own, dict):
        raise TPODataError(f"{path}: section {section!r} holds {own!r}, not a mapping of settings.",
                           f"Write it as `{section}:` followed by indented `key: value` lines "
                           "(see recipes/pit-smollm2.yaml).")
    return own


def load_recipe(path: str | Path, section: str, known: set[str]) -> dict[str, Any]:
    """Shared top-level keys this stage knows, overridden by the stage's own section."""
    from tpo_data.cli import read_recipe

    data = read_recipe(path)
    shared = {k: v for k, v in data.items() if k not in RECIPE_SECTIONS and k in known}
    own = recipe_section(data, section, path)
    unknown = sorted(set(own) - known)
    if unknown:
        raise TPODataError(f"{path}: unknown keys in section {section!r}: {', '.join(unknown)}.",
                           f"Remove them, or run with --help to see what {section!r} accepts.")
    return {**shared, **own}


def parse_stage(section: str, types: Sequence[type], argv: Sequence[str] | None,
                training: bool = False, prog: str | None = None) -> tuple:
    """TRL-style parsing: ``--config recipe.yaml`` sets defaults, the command line overrides them.

    With ``training``, a machine without CUDA defaults to CPU, fp32 and no gradient
    checkpointing (TRL's configs default to bf16 and refuse it without a GPU), and logs
    go nowhere unless asked; recipe and command line still override these.
    """
    import sys

    import torch

    from tpo_data.cli import parse_checked, recipe_parser, split_recipe

    recipe, argv = split_recipe(sys.argv[1:] if argv is None else argv)
    parser = recipe_parser(list(types), prog)
    if training:
        parser.set_defaults(report_to="none")
        if not torch.cuda.is_available():
            parser.set_defaults(use_cpu=True, bf16=False, gradient_checkpointing=False)
    if recipe is not None:
        known = {f.name for t in types for f in fields(t)}
        parser.set_defaults_with_config(**load_recipe(recipe, section, known))
    return parse_checked(parser, lambda: parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True))


# --- data ------------------------------------------------------------------------------


def load_rows(store: str, version: str, config: str = TRAIN, max_examples: int | None = None):
    """One config of a store version as a ``datasets.Dataset``, optionally cut."""
    from tpo_data.store import LocalStore

    local = LocalStore(store)
    # Checked before loading: `datasets` cannot load a config with no rows at all.
    if local.manifest(version).get("row_counts", {}).get(config) == 0:
        raise TPODataError(f"{store}/{version} ({config}) has no rows.",
                           "Build it with pipelines/pit.py from a larger preference dataset "
                           "(for 'test': a --holdout_size above 0).")
    ds = local.load(version, config)
    if max_examples is not None:
        ds = ds.select(range(min(max_examples, ds.num_rows)))
    return ds


def rl_dataset(ds):
    """Rows for RLOO: the improvement prompt with each row's y_ref, keeping x and y_ref for the reward."""
    missing = {"instruction", "reference"} - set(ds.column_names)
    if missing:
        raise TPODataError(f"The RL rows lack column(s) {sorted(missing)}.",
                           "Use a version written by pipelines/pit.py (pit-sft-1 or pit-rl-refs-2).")
    return ds.map(lambda r: {"prompt": improvement_messages(r["instruction"], r["reference"])},
                  remove_columns=[c for c in ds.column_names if c not in ("instruction", "reference")])


def model_path(name: str, what: str) -> str:
    from tpo_data.models import resolve_model

    try:
        return str(resolve_model(name, what))
    except TPODataError as err:
        raise TPODataError(f"{what}: {err.problem}", err.fix) from None


def freeze_lower_layers(model: Any, train_layers: int, checkpointing: bool = False) -> Any:
    """Leave only the last ``train_layers`` decoder layers, the final norm and a ``score`` head trainable.

    ``0`` keeps everything trainable. The embeddings (tied to the LM head in SmolLM2) stay
    frozen, so backward stops below the first trained layer: on a CPU that is most of a
    training step's cost.
    """
    if train_layers <= 0:
        return model
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise TPODataError(f"--train_layers needs a decoder with .layers; {type(model).__name__} has none.",
                           "Use --train_layers 0 (train all weights) for this model.")
    if train_layers > len(layers):
        raise TPODataError(f"--train_layers {train_layers} exceeds the model's {len(layers)} layers.",
                           f"Pass at most {len(layers)}, or 0 for all weights.")
    model.requires_grad_(False)
    for module in (*layers[-train_layers:], getattr(base, "norm", None), getattr(model, "score", None)):
        if module is not None:
            module.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("Training the last %d of %d layers: %.1fM of %.1fM parameters", train_layers, len(layers),
             trainable / 1e6, sum(p.numel() for p in model.parameters()) / 1e6)
    if checkpointing:
        # Reentrant checkpointing needs an input that requires grad, or the trained layers get none.
        model.enable_input_require_grads()
    return model


# --- the gap reward model ----------------------------------------------------------------


def encode_gap(tokenizer: Any, texts: list[str], max_length: int) -> dict:
    """Right-padded ids; an over-long text loses its start, so both answers and the question stay."""
    tokenizer.truncation_side = "left"
    return tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


class GapRewardModel:
    """R(x, y1, y2) from a folder written by ``trainers/pit.py reward``."""

    def __init__(self, path: str | Path, *, batch_size: int = 8, max_length: int | None = None,
                 device: str = "auto"):
        from transformers import AutoModelForSequenceClassification

        from tpo_data.reward_models import resolve_device

        folder = Path(path)
        if not (folder / GAP_MARKER).is_file():
            raise TPODataError(
                f"{folder} is not a PIT gap reward model (no {GAP_MARKER}"
                + ("" if folder.is_dir() else "; the folder does not exist") + ").",
                "Train one with `python trainers/pit.py reward --config recipes/pit-smollm2.yaml` "
                "and pass its output_dir.",
            )
        # Scored as trained: texts cut at the trained length, unless the caller says otherwise.
        trained = json.loads((folder / GAP_MARKER).read_text("utf-8")).get("max_length", 1024)
        self.batch_size, self.max_length = batch_size, max_length or trained
        self.device = resolve_device(device)
        self.tokenizer = load_tokenizer(str(folder))
        self.model = AutoModelForSequenceClassification.from_pretrained(str(folder)).to(self.device).eval()

    def gap(self, instructions: Sequence[str], firsts: Sequence[str], seconds: Sequence[str]) -> list[float]:
        """How much better each first answer is than its second, one float per row."""
        import torch

        texts = [gap_text(x, a, b) for x, a, b in zip(instructions, firsts, seconds, strict=True)]
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            enc = encode_gap(self.tokenizer, texts[start : start + self.batch_size], self.max_length)
            with torch.inference_mode():
                logits = self.model(**enc.to(self.device)).logits
            scores.extend(logits[:, 0].float().cpu().tolist())
        return scores

    def calibrated_gap(self, instructions: Sequence[str], new: Sequence[str], last: Sequence[str]) -> list[float]:
        """R(x, new, last) - R(x, last, last): above 0 means ``new`` beats ``last``.

        The ranking loss only fixes differences between scores, so the level of the
        middle class R(x, y, y) is arbitrary (a trained model gave an unchanged copy +1.7).
        Measuring from the model's own "equal answers" score makes 0 the no-change point;
        an unchanged answer gets exactly 0 without a call (batches of other padding would
        give it float noise, and a +1e-7 would count as an improvement).
        """
        changed = [i for i, (a, b) in enumerate(zip(new, last, strict=True)) if a != b]
        x, y, y_last = ([texts[i] for i in changed] for texts in (instructions, new, last))
        raw, same = self.gap(x, y, y_last), self.gap(x, y_last, y_last)
        gaps = [0.0] * len(new)
        for i, a, b in zip(changed, raw, same):
            gaps[i] = a - b
        return gaps


def gap_collator(tokenizer: Any, max_length: int):
    """Batches of (x, y_w, y_l) rows as 4 consecutive texts per row: (w,l), (w,w), (l,l), (l,w)."""

    def collate(rows: list[dict[str, Any]]) -> dict:
        texts = [t for r in rows for t in gap_inputs(r["instruction"], r["better"], r["reference"])]
        return dict(encode_gap(tokenizer, texts, max_length))

    return collate


def gap_batch_loss(model: Any, inputs: dict) -> tuple[Any, Any]:
    """The gap ranking loss of a :func:`gap_collator` batch, and its rewards shaped (examples, 4)."""
    rewards = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, 0]
    r = rewards.view(-1, 4)
    return gap_ranking_loss(r[:, 0], r[:, 1], r[:, 2], r[:, 3]), r


def _gap_trainer_class():
    from transformers import Trainer

    class GapRewardTrainer(Trainer):
        """A Trainer whose loss is the five-term gap ranking loss over the 4 inputs per example."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, rewards = gap_batch_loss(model, inputs)
            return (loss, {"rewards": rewards}) if return_outputs else loss

    return GapRewardTrainer


# --- stages ------------------------------------------------------------------------------


def _load(auto_class: Any, path: str, config, **kwargs: Any) -> Any:
    """``auto_class.from_pretrained`` in float32 unless ``model_init_kwargs`` say otherwise.

    TRL loads a model given by name in float32; transformers 5's from_pretrained keeps the
    checkpoint's dtype, and AdamW steps of 1e-5 mostly round away in bf16 weights.
    """
    import torch

    init = {"dtype": torch.float32, **(getattr(config, "model_init_kwargs", None) or {}), **kwargs}
    return auto_class.from_pretrained(path, **init)


def _train_and_save(trainer: Any, config) -> Path:
    """Train (resuming from ``--resume_from_checkpoint``) and save full weights to ``output_dir``,
    as trainers/dpo.py does (``main`` checks them)."""
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    if trainer.is_fsdp_enabled:
        # save_model writes nothing from sharded state dicts (FSDP2's default): gather a full one.
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    out = Path(config.output_dir)
    trainer.save_model(str(out))  # gathers sharded weights, so every process calls it
    trainer.accelerator.wait_for_everyone()
    return out


def run_sft(data: PITDataArguments, stage: SFTStageArguments, config) -> Path:
    """Fine-tune M_PIT to write y_w given (x, y_l); returns the saved model folder."""
    from trl import SFTTrainer

    path = model_path(stage.model, "--model")
    ds = load_rows(data.store, data.version, TRAIN, data.max_examples).select_columns(["prompt", "completion"])
    model: Any = path
    if stage.train_layers:
        from transformers import AutoModelForCausalLM

        model = freeze_lower_layers(_load(AutoModelForCausalLM, path, config), stage.train_layers,
                                    config.gradient_checkpointing)
    trainer = SFTTrainer(model=model, args=config, train_dataset=ds, processing_class=load_tokenizer(path))
    return _train_and_save(trainer, config)


def run_reward(data: PITDataArguments, stage: RewardStageArguments, config) -> Path:
    """Train the gap reward model; returns its folder (with the gap marker file)."""
    from transformers import AutoModelForSequenceClassification

    path = model_path(stage.model, "--model")
    tokenizer = load_tokenizer(path)
    model = _load(AutoModelForSequenceClassification, path, config, num_labels=1)
    # The head finds each row's last token through the pad id.
    model.config.pad_token_id = tokenizer.pad_token_id
    freeze_lower_layers(model, stage.train_layers, config.gradient_checkpointing)
    ds = load_rows(data.store, data.version, TRAIN, data.max_examples).select_columns(
        ["instruction", "better", "reference"])
    config.remove_unused_columns = False  # the collator needs the raw text columns
    trainer = _gap_trainer_class()(model=model, args=config, train_dataset=ds, processing_class=tokenizer,
                                   data_collator=gap_collator(tokenizer, stage.max_length))
    out = _train_and_save(trainer, config)
    if config.should_save:  # the process save_model wrote from (one per run, or per node)
        (out / GAP_MARKER).write_text(json.dumps({
            "kind": "pit-gap-reward", "format": gap_text("{instruction}", "{y1}", "{y2}"),
            "max_length": stage.max_length, "base_model": path, "train_version": data.version,
        }, indent=2))
    trainer.accelerator.wait_for_everyone()  # no rank returns before the marker exists
    return out


def gap_reward_function(reward_model: GapRewardModel):
    """A TRL reward function: R(x, completion, y_ref) with x and y_ref from the dataset row."""

    def gap_reward(prompts, completions, instruction, reference, **kwargs) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return reward_model.gap(instruction, texts, reference)

    return gap_reward


def check_round_two(data: PITDataArguments, stage: RLStageArguments, path: str, kl_path: str | None,
                    output_dir: str) -> None:
    """Round 2 continues round 1 (METHOD.md 2.4: round 2 alone +1.7%, both rounds +13.0%)."""
    from tpo_data.store import LocalStore

    if kl_path and Path(path).resolve() == Path(kl_path).resolve():
        raise TPODataError(
            f"RL round 2 would start from {path}, its KL reference (the SFT model): that skips round 1",
            "pass --model ROUND1_OUTPUT_DIR (the rl section's output_dir), as recipes/pit-smollm2.yaml's rl2 does",
        )
    made_by = json.loads((Path(path) / RL_MARKER).read_text("utf-8")) if (Path(path) / RL_MARKER).is_file() else {}
    if made_by.get("round") != 1:
        raise TPODataError(
            f"RL round 2 would start from {path}, which no RL round 1 wrote (no {RL_MARKER} of round 1): "
            "that skips round 1 (METHOD.md 2.4: round 2 alone +1.7%, both rounds +13.0%)",
            "pass --model ROUND1_OUTPUT_DIR (the rl section's output_dir), as recipes/pit-smollm2.yaml's rl2 "
            f"does; a round-1 policy trained before tpo-data wrote {RL_MARKER} must be trained again",
        )
    if Path(output_dir).resolve() == Path(path).resolve():
        raise TPODataError(f"RL round 2 would write over the model it starts from ({path})",
                           "pass another --output_dir (the recipe's rl2 section has one)")
    refs_parent = LocalStore(data.store).manifest(stage.refs_version).get("parent_version")
    if refs_parent != data.version:
        raise TPODataError(
            f"{stage.refs_version} holds references for the instructions of {refs_parent}, not of {data.version}",
            f"rebuild them: python pipelines/pit.py --stage refs --sft_version {data.version} (or pass the "
            "--version they were made from)",
        )


def run_rl(data: PITDataArguments, stage: RLStageArguments, config) -> Path:
    """One curriculum round of RLOO against the gap reward; returns the saved policy folder."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import is_deepspeed_zero3_enabled
    from trl import RLOOTrainer

    if is_deepspeed_zero3_enabled():
        raise TPODataError(
            "the rl stage calls the gap reward model outside DeepSpeed's engine, and ZeRO-3 would "
            "partition its weights across the processes",
            "run the rl stage under DeepSpeed ZeRO-2, FSDP or plain DDP (another `accelerate launch` config)",
        )
    path = model_path(stage.model, "--model")
    kl_path = model_path(stage.kl_reference, "--kl_reference") if stage.kl_reference else None
    if stage.round == 2:
        check_round_two(data, stage, path, kl_path, config.output_dir)
    reward_model = GapRewardModel(stage.reward_model, batch_size=stage.reward_batch_size,
                                  max_length=stage.reward_max_length)
    version = data.version if stage.round == 1 else stage.refs_version
    ds = rl_dataset(load_rows(data.store, version, TRAIN, data.max_examples))
    policy: Any = path
    if stage.kl_reference or stage.train_layers:
        policy = freeze_lower_layers(_load(AutoModelForCausalLM, path, config), stage.train_layers,
                                     config.gradient_checkpointing)
    if kl_path:
        policy.config._name_or_path = kl_path
    elif stage.round == 2 and config.beta:
        log.warning("RL round 2 without --kl_reference: the KL term anchors to %s (the round-1 "
                    "policy), not to the SFT model as in the paper; pass --kl_reference SFT_MODEL.", path)
    log.info("RL round %d on %d rows of %s (beta=%s)", stage.round, ds.num_rows, version, config.beta)
    trainer = RLOOTrainer(model=policy, reward_funcs=gap_reward_function(reward_model), args=config,
                          train_dataset=ds, processing_class=load_tokenizer(path))
    out = _train_and_save(trainer, config)
    if config.should_save:
        (out / RL_MARKER).write_text(json.dumps({
            "round": stage.round, "start_model": path, "kl_reference": kl_path or path,
            "reward_model": stage.reward_model, "train_version": version,
        }, indent=2))
    trainer.accelerator.wait_for_everyone()  # no rank returns before the marker exists
    return out


def main(argv: Sequence[str] | None = None) -> Path:
    """``trainers/pit.py STAGE [--config recipe.yaml] [--key value ...]``."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in STAGES:
        raise TPODataError(
            f"First argument must be a stage: {', '.join(STAGES)} (got {argv[0] if argv else 'nothing'!r}).",
            "Run e.g. `python trainers/pit.py sft --config recipes/pit-smollm2.yaml`.",
        )
    stage, rest = argv[0], argv[1:]
    from transformers import TrainingArguments, set_seed
    from trl import RLOOConfig, SFTConfig

    types, run = {
        "sft": ((SFTStageArguments, SFTConfig), run_sft),
        "reward": ((RewardStageArguments, TrainingArguments), run_reward),
        "rl": ((RLStageArguments, RLOOConfig), run_rl),
    }[stage]
    data, args, config = parse_stage(stage, (PITDataArguments, *types), rest, training=True,
                                     prog=f"trainers/pit.py {stage}")
    # Published by us once the folder (gap marker too) is complete.
    push = hub.take_model_push(config, config.process_index == 0)
    # Before any model is built: the reward stage's new score head is drawn from the global RNG.
    set_seed(config.seed)
    out = run(data, args, config)
    # After the stage's last barrier: a rank that raises here leaves no other rank waiting.
    if config.should_save:
        check_saved(out, adapter=False)
    if push:
        commit = push.publish(out)
        print(f"Published the {stage} model to the Hub: {push.repo_id} (commit {commit})")
    end_process_group()
    print(f"Saved the {stage} model to {out}")
    return out

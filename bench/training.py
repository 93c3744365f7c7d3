"""Training throughput: trainers/dpo.py vs TRL's own ``trl dpo`` command on the same work.

Measured in one run, on the same pairs (built-in instructions in the generic
thought prompt, synthetic thoughts and responses of realistic length, written
as a store version), the same model, batch size, max_length, epochs, seed, fp32
and use_cpu, each run in its own process with the same thread count:
  1. ours: ``trainers/dpo.py`` with its defaults (reference log-probs precomputed
     once, no gradient checkpointing on CPU);
  2. trl dpo: TRL's command with its defaults (the reference model runs at every
     step, gradient checkpointing on);
  3. trl dpo, our settings: TRL's command with ``--precompute_ref_log_probs true
     --gradient_checkpointing false``, to show the difference is those settings
     and not the code around the trainer.

tokens/s = non-pad tokens the trainer processed (its ``num_tokens``, prompt +
completion of both chosen and rejected) / seconds. A run's seconds are its
``train_runtime``; ours also counts the whole DPOTrainer set-up (model load,
tokenization and the reference precompute, which runs before the train loop),
so ours is charged for its precompute and more. Bar: ours >= 1.0x trl dpo.

OMP_NUM_THREADS is set to the core count for every run: ``accelerate launch``
(which ``trl dpo`` goes through) otherwise pins the process to 1 thread on CPU.

Usage:
    .venv/bin/python bench/training.py                     # random 4-layer/256 Llama, SmolLM2 tokenizer
    .venv/bin/python bench/training.py --model embedded    # SmolLM2-135M-Instruct
    .venv/bin/python bench/training.py --pairs 64 --max_length 512 --repeats 3   # steadier, slower
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

from tpo_data.card import card_metadata
from tpo_data.models import resolve_model
from tpo_data.prompts import PRESETS
from tpo_data.store import LocalStore

REPO = Path(__file__).resolve().parents[1]
TRL = Path(sys.executable).with_name("trl")


def make_model(target: Path, hidden: int, layers: int) -> Path:
    """A random Llama at the given size with SmolLM2's real tokenizer (vocab 49,152)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("embedded"))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
        num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
        max_position_embeddings=2048, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def make_pairs(store: LocalStore, n_pairs: int, parent: str, seed: int = 0) -> Path:
    """``n_pairs`` TPO-shaped pairs: generic thought prompt, thought + separator + response."""
    import datasets

    rng = random.Random(seed)
    builtin = [json.loads(line) for line in
               (files("tpo_data") / "data/instructions.jsonl").read_text().splitlines() if line]
    if n_pairs > len(builtin):
        sys.exit(f"--pairs is at most {len(builtin)} (the built-in instructions)")
    instructions = builtin[:n_pairs]
    words = " ".join(i["instruction"] for i in builtin).split()
    prompt = PRESETS["generic"]

    def output(thought_words: int, response_words: int) -> str:
        thought = " ".join(rng.choices(words, k=thought_words))
        response = " ".join(rng.choices(words, k=response_words))
        return f"{prompt.thought_marker} {thought}\n{prompt.separator} {response}"

    rows = [
        {
            "prompt": prompt.messages(item["instruction"]),
            "chosen": [{"role": "assistant",
                        "content": output(rng.randint(10, 40), rng.randint(20, 100))}],
            "rejected": [{"role": "assistant",
                          "content": output(rng.randint(10, 40), rng.randint(20, 100))}],
            "instruction_id": item["id"],
        }
        for item in instructions
    ]
    card = f"---\n{yaml.safe_dump(card_metadata(['pairs']))}---\n# Benchmark pairs\n"
    manifest = {"iteration": 1, "parent_model": parent}
    return store.write_version("bench", {"pairs": datasets.Dataset.from_list(rows)}, manifest, card)


def run(command: list[str], env: dict[str, str]) -> str:
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"command failed: {' '.join(command)}\n{result.stderr[-4000:]}")
    return result.stdout


def logged(stdout: str) -> list[dict[str, Any]]:
    """The dicts the Trainer printed (disable_tqdm prints every log as a dict)."""
    found = []
    for line in stdout.splitlines():
        if line.startswith("{") and line.endswith("}"):
            found.append({k: float(v) for k, v in ast.literal_eval(line).items()})
    return found


def measure(stdout: str, extra_seconds: float = 0.0) -> dict[str, float]:
    logs = logged(stdout)
    tokens = max(entry["num_tokens"] for entry in logs if "num_tokens" in entry)
    runtime = next(entry["train_runtime"] for entry in logs if "train_runtime" in entry)
    seconds = runtime + extra_seconds
    return {"tokens": tokens, "train_runtime": runtime, "seconds": seconds,
            "tokens_per_s": tokens / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None,
                        help="model folder or 'embedded'; default: a random Llama (--hidden, --layers)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each; the median is reported")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        report(args, Path(tmp))


def report(args: argparse.Namespace, tmp: Path) -> None:
    model = (str(resolve_model(args.model)) if args.model
             else str(make_model(tmp / "model", args.hidden, args.layers)))
    store = LocalStore(tmp / "store")
    folder = make_pairs(store, args.pairs, model)
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    threads = str(len(cores))
    # A fresh datasets cache: it keys a local folder by its name, so `trl dpo` would
    # otherwise read the rows of any earlier folder called "bench".
    env = {**os.environ, "OMP_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp / "datasets-cache"),
           "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
    shared = [
        "--num_train_epochs", str(args.epochs), "--per_device_train_batch_size", str(args.batch_size),
        "--max_length", str(args.max_length), "--learning_rate", "5e-6", "--beta", "0.1",
        "--seed", "0", "--use_cpu", "true", "--bf16", "false", "--logging_steps", "1",
        "--disable_tqdm", "true", "--report_to", "none", "--save_strategy", "no",
        "--eval_strategy", "no", "--dataloader_pin_memory", "false",
    ]
    trl_data = ["--model_name_or_path", model, "--dataset_name", str(folder),
                "--dataset_config", "pairs"]
    runs = {
        "ours (trainers/dpo.py)": lambda out: [
            sys.executable, "trainers/dpo.py", "--dataset_store", str(store.root),
            "--dataset_version", "bench", "--output_dir", out, *shared],
        "trl dpo (its defaults)": lambda out: [str(TRL), "dpo", *trl_data, "--output_dir", out, *shared],
        "trl dpo + our settings": lambda out: [
            str(TRL), "dpo", *trl_data, "--output_dir", out, *shared,
            "--precompute_ref_log_probs", "true", "--gradient_checkpointing", "false"],
    }
    results: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
    for repeat in range(args.repeats):
        for i, (name, command) in enumerate(runs.items()):  # interleaved: load drifts hit all alike
            out = str(tmp / f"out-{i}-{repeat}")
            stdout = run(command(out), env)
            setup = 0.0
            if name.startswith("ours"):
                setup = json.loads((Path(out) / "lineage.json").read_text())["metrics"]["setup_runtime"]
            results[name].append(measure(stdout, setup))
            print(f"  {name}: {results[name][-1]['tokens_per_s']:.0f} tokens/s", file=sys.stderr,
                  flush=True)

    tokens = {r["tokens"] for runs_ in results.values() for r in runs_}
    if len(tokens) != 1:
        sys.exit(f"the runs processed different token counts ({sorted(tokens)}): not the same work")
    median = {name: statistics.median(r["tokens_per_s"] for r in rs) for name, rs in results.items()}
    base = median["trl dpo (its defaults)"]

    from rich.console import Console
    from rich.table import Table

    name = args.model or f"random Llama {args.layers}x{args.hidden}, SmolLM2 tokenizer"
    table = Table(title=f"DPO training throughput ({name}, {args.pairs} pairs x "
                        f"{args.epochs} epochs, batch {args.batch_size}, max_length {args.max_length}, "
                        f"fp32, CPU, {threads} threads, median of {args.repeats})")
    for column in ("run", "tokens", "train_runtime s", "counted s", "tokens/s", "vs trl dpo"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for name, rs in results.items():
        mid = sorted(rs, key=lambda r: r["tokens_per_s"])[len(rs) // 2]
        table.add_row(name, f"{mid['tokens']:.0f}", f"{mid['train_runtime']:.1f}",
                      f"{mid['seconds']:.1f}", f"{median[name]:.0f}", f"{median[name] / base:.2f}x")
    Console(width=120).print(table)
    ratio = median["ours (trainers/dpo.py)"] / base
    print(f"bar ours >= 1.0x trl dpo: {'PASS' if ratio >= 1.0 else 'FAIL'} ({ratio:.2f}x)")
    print(json.dumps({"model": model, "results": results}, default=float))


if __name__ == "__main__":
    main()

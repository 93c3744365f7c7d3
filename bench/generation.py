"""Generation throughput: the pipeline's generation stage vs the raw engine vs transformers.generate.

Measured in one run, on the same prompts (built-in instructions in the generic
thought prompt), the same sampling (T=0.8, top-p 0.95, K samples per prompt) and
exactly the same number of generated tokens (EOS ignored, so every engine does
the same work):
  1. pipeline: the distilabel generation stage (``load >> generate >> split``)
     against a vLLM server, built as ``pipelines/tpo.py`` builds it;
  2. raw engine: the same vLLM server called directly with the OpenAI client,
     one request with n=K per prompt, all prompts in flight at once;
  3. transformers.generate: the same model in-process, all prompts in one
     batched call with num_return_sequences=K, in bf16 (vLLM's dtype) and fp32.

The server runs as the pipeline starts it (``tpo_data.vllm_server``: on CPU,
32-token KV blocks and 256 sequences per step, and the tpo_data.vllm_top_p
plugin). Each vLLM measurement sends its own ``cache_salt``, so the K samples
of one request share their prompt's KV cache but nothing carries over from an
earlier measurement: every measurement starts cold, as a new iteration does.

Bars (issue 2): pipeline >= 0.9x raw engine; vLLM (the default CPU engine) >= 2.5x
transformers.generate.

Usage:
    .venv/bin/python bench/generation.py     # the README's figures: 24 prompts x K=8 x 192 tokens (~15 min)
    .venv/bin/python bench/generation.py --prompts 8 --max_new_tokens 64 --repeats 1   # a quick look (~4 min)

The README's figures use the main recipe's generation length (192 tokens). The
pipeline stage includes distilabel's start and stop (about 4 s: it polls its
step processes every 2.5 s while they load), so short runs understate it: the
quick look above reads about 0.7x. The pipeline runs in this process here;
``tpo-data generate`` runs it in a freshly spawned one (another 2-3 s once).

``--hf_prompts N`` measures transformers.generate on the first N prompts only,
for a quicker look; the README's figures use all prompts on every engine.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from tempfile import TemporaryDirectory

from tpo_data.engines import EngineArguments, SamplingArguments, build_llm
from tpo_data.instructions import InstructionArguments, load_instructions
from tpo_data.models import resolve_model
from tpo_data.pipeline import build_pipeline
from tpo_data.prompts import PRESETS
from tpo_data.vllm_server import VLLMServer


def raw_engine(server: VLLMServer, prompts: list[list[dict]], args) -> float:
    from openai import OpenAI

    client = OpenAI(base_url=server.base_url, api_key="EMPTY", timeout=3600)
    salt = uuid.uuid4().hex  # a cold prefix cache for this measurement

    def one(messages):
        reply = client.chat.completions.create(
            model=server.served_model_name, messages=messages, n=args.num_samples,
            temperature=0.8, top_p=0.95, max_tokens=args.max_new_tokens,
            extra_body={"ignore_eos": True, "cache_salt": salt},
        )
        return reply.usage.completion_tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        tokens = sum(pool.map(one, prompts))
    return tokens / (time.perf_counter() - start)


def pipeline_stage(server: VLLMServer, rows: list[dict], args) -> float:
    engine = EngineArguments(engine="vllm", base_url=server.base_url,
                             served_model_name=server.served_model_name)
    sampling = SamplingArguments(num_samples=args.num_samples, max_new_tokens=args.max_new_tokens)
    llm = build_llm(engine, sampling, server.model, server.base_url, server.served_model_name)
    llm.generation_kwargs["extra_body"] = {"ignore_eos": True, "cache_salt": uuid.uuid4().hex}
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    with TemporaryDirectory() as cache:
        pipeline = build_pipeline(
            f"bench-{time.time_ns()}", rows, PRESETS["generic"], llm, args.num_samples,
            input_batch_size=len(rows), cache_dir=Path(cache),
        )
        start = time.perf_counter()
        distiset = pipeline.run(use_cache=False)
        elapsed = time.perf_counter() - start
    # distilabel leaves the root logger on its (now closed) log queue; later logs would fail.
    root.handlers[:], root.level = handlers, level
    produced = list(distiset["default"]["train"])
    assert len(produced) == len(rows) and all(r["engine_ok"] for r in produced)
    return len(rows) * args.num_samples * args.max_new_tokens / elapsed


def transformers_generate(model_path: str, prompts: list[list[dict]], args, dtype: str) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).eval()
    enc = tokenizer.apply_chat_template(prompts, add_generation_prompt=True, padding=True,
                                        return_tensors="pt", return_dict=True)
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**enc, do_sample=True, temperature=0.8, top_p=0.95,
                             num_return_sequences=args.num_samples,
                             max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id)
    elapsed = time.perf_counter() - start
    generated = out.shape[0] * (out.shape[1] - enc["input_ids"].shape[1])
    return generated / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--num_samples", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=192, help="default: the main recipe's")
    parser.add_argument("--hf_prompts", type=int, default=None,
                        help="prompts for transformers.generate (default: all of --prompts)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="interleaved vLLM measurements (raw, pipeline, raw, ...); the best of each "
                             "counts, as the machine may be shared (default 2)")
    parser.add_argument("--port", type=int, default=8021)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1 (got {args.repeats}): each vLLM measurement runs that often")

    from rich.console import Console
    from rich.table import Table

    model_path = str(resolve_model(args.model))
    rows = load_instructions(InstructionArguments())[: args.prompts]
    prompts = [PRESETS["generic"].messages(r["instruction"]) for r in rows]
    with VLLMServer(model_path, port=args.port, served_model_name="policy", dtype="bfloat16",
                    log_path=Path(".cache") / "bench-vllm.log") as server:
        raw_engine(server, prompts[:2], args)  # warm-up: compile and fill caches
        runs = [(raw_engine(server, prompts, args), pipeline_stage(server, rows, args))
                for _ in range(args.repeats)]
        results = {"raw engine (vLLM, n=K)": max(raw for raw, _ in runs),
                   "pipeline generation stage": max(pipe for _, pipe in runs)}
    hf_prompts = prompts[: args.hf_prompts or len(prompts)]
    results["transformers.generate bf16"] = transformers_generate(model_path, hf_prompts, args, "bfloat16")
    results["transformers.generate fp32"] = transformers_generate(model_path, hf_prompts, args, "float32")

    raw = results["raw engine (vLLM, n=K)"]
    ratios = {
        "pipeline / raw engine (bar >= 0.9)": results["pipeline generation stage"] / raw,
        "vLLM / transformers.generate bf16 (bar >= 2.5)": raw / results["transformers.generate bf16"],
        "vLLM / transformers.generate fp32": raw / results["transformers.generate fp32"],
    }
    table = Table(title=f"{args.prompts} prompts x K={args.num_samples} x {args.max_new_tokens} tokens, "
                        f"{Path(model_path).name}, vLLM best of {args.repeats}")
    table.add_column("what")
    table.add_column("value", justify="right")
    for name, value in results.items():
        table.add_row(name, f"{value:,.1f} tok/s")
    for name, value in ratios.items():
        table.add_row(name, f"{value:.2f}x")
    Console().print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), "tok_per_s": results, "ratios": ratios,
                                               "vllm_runs": runs}, indent=2))


if __name__ == "__main__":
    main()

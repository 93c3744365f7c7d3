"""One TPO iteration's data stage: instructions -> K samples -> split (-> judge, pairs).

This is the logic behind ``pipelines/tpo.py`` and ``tpo-data generate``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

from tpo_data.engines import EngineArguments, SamplingArguments
from tpo_data.errors import TPODataError
from tpo_data.instructions import (
    InstructionArguments,
    SliceLedger,
    load_instructions,
    select_iteration_rows,
)
from tpo_data.models import resolve_model
from tpo_data.pipeline import GenerationResult, RunArguments, check_context, generate_samples
from tpo_data.prompts import load_prompt

log = logging.getLogger("tpo_data")

ARGUMENT_TYPES = (InstructionArguments, EngineArguments, SamplingArguments, RunArguments)


def run_generation(instructions: InstructionArguments, engine: EngineArguments,
                   sampling: SamplingArguments, run: RunArguments) -> GenerationResult:
    """Validate everything that can be checked cheaply, then generate (resuming if needed)."""
    from transformers import AutoConfig, AutoTokenizer

    prompt = load_prompt(run.thought_prompt)
    model_path = str(resolve_model(engine.model))
    rows = load_instructions(instructions)
    out_dir = run.iteration_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    ledger = SliceLedger(Path(run.output_dir) / "slices.json")
    rows = select_iteration_rows(rows, instructions, ledger, run.iteration)

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    context = getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", None)
    if engine.engine == "vllm" and not engine.base_url:
        context = min(context or engine.vllm_max_model_len, engine.vllm_max_model_len)
    if context:
        check_context(rows, prompt, tokenizer, sampling.max_new_tokens, context)

    (out_dir / "run_config.json").write_text(json.dumps({
        "instructions": asdict(instructions), "engine": asdict(engine),
        "sampling": asdict(sampling), "run": asdict(run), "model_path": model_path,
    }, indent=2, default=str))
    return generate_samples(rows, prompt, engine, sampling, run, model_path)


def summarize_generation(result: GenerationResult) -> str:
    failed = result.samples - result.parsed
    return (
        f"Samples: {result.samples} for {len(result.rows)} instructions in {result.path}\n"
        f"Parsed: {result.parsed}/{result.samples} ({result.parse_rate:.1%}); "
        f"parse failures (no separator): {failed}"
    )


def require_pairs_possible(sampling: SamplingArguments) -> None:
    if sampling.num_samples < 2:
        raise TPODataError(
            f"--num_samples {sampling.num_samples} cannot form a chosen/rejected pair.",
            "Use --num_samples 2 or more (the paper uses 8).",
        )


def main(argv: list[str] | None = None) -> GenerationResult:
    """Parse ``--config recipe.yaml`` plus CLI overrides (TRL style) and run the stage."""
    from trl import TrlParser

    parser = TrlParser(ARGUMENT_TYPES)
    instructions, engine, sampling, run = parser.parse_args_and_config(argv)
    result = run_generation(instructions, engine, sampling, run)
    print(summarize_generation(result))
    return result

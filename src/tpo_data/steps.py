"""distilabel steps of the TPO pipeline: ``load >> generate >> split [>> judge] >> checkpoint``.

``ThoughtGeneration`` wraps each instruction in the thought prompt and asks the
engine for K samples in one call; ``SplitThoughts`` splits every sample into
thought and response. A batch the engine failed on arrives here with
``generation = None`` (distilabel imputes failed batches instead of stopping);
it is marked ``engine_ok = False`` so the runner can report and retry it,
never mistaking it for a parse failure.

``CheckpointRows``, the last step, checkpoints every finished batch
(atomically, one file per batch), so checkpoints hold judged rows.
distilabel's cache cannot resume a run killed with SIGKILL: the batch that
was in a step's input queue is lost while the batch manager counts it as
sent, and the resumed run waits for it forever (upstream issue
argilla-io/distilabel#1065). So pipelines run without it (``use_cache=False``)
and the runner resumes from the last finished batch's checkpoint instead.
"""

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distilabel.steps import Step, StepInput
from distilabel.steps.tasks import Task
from distilabel.utils import logging as distilabel_logging

from tpo_data.parsing import split_output
from tpo_data.files import write_text_atomic
from tpo_data.prompts import ThoughtPrompt


def _silence_httpx2() -> None:
    """Adapter: distilabel 1.5.3 silences the ``httpx`` logger in its step workers, but openai 3
    sends requests through ``httpx2``, which then logs every request at INFO (hundreds of lines
    per judged iteration). The workers are spawned and import this module when they unpickle
    our steps, after distilabel's own logging setup, so doing it at import reaches them."""
    if "httpx2" not in distilabel_logging._SILENT_LOGGERS:
        distilabel_logging._SILENT_LOGGERS.append("httpx2")
    logging.getLogger("httpx2").setLevel(logging.CRITICAL)


_silence_httpx2()

if TYPE_CHECKING:
    from distilabel.typing import StepOutput

class ThoughtGeneration(Task):
    """Sample K thought+response outputs for an instruction wrapped in a thought prompt."""

    prompt_user: str
    prompt_system: str | None = None

    @property
    def inputs(self) -> list[str]:
        return ["instruction"]

    @property
    def outputs(self) -> list[str]:
        return ["generation", "model_name"]

    def format_input(self, input: dict[str, Any]) -> list[dict[str, str]]:
        prompt = ThoughtPrompt(
            name="pipeline", user=self.prompt_user, separator=None, system=self.prompt_system
        )
        return prompt.messages(input["instruction"])

    def format_output(self, output: str | None, input: dict[str, Any] | None = None) -> dict:
        return {"generation": output}


# Per-row counts every judge step writes (zeroed first; summed in the run statistics).
JUDGE_COUNTERS = ("judge_calls", "judge_unparsable", "judge_forced", "judge_first_wins", "judge_truncated")
JUDGE_COLUMNS = ("scores", *JUDGE_COUNTERS)
# The columns a finished row keeps in checkpoints and the iteration ledger.
KEEP = ("id", "instruction", "category", "generation", "thoughts", "responses", "parsed",
        "truncated", "model_name", *JUDGE_COLUMNS)
# Where distilabel puts the engine's per-sample finish reasons (an LLM output's extra
# key ``finish_reason`` becomes ``llm_<task name>_finish_reason``; the task is "generate").
FINISH_COLUMN = "llm_generate_finish_reason"


def is_finished(row: dict, judged: bool) -> bool:
    """Whether a row came through every step: generated and, when judging, scored.

    A batch that failed in the engine or the judge arrives with its outputs
    imputed as None; such rows are retried by the next run.
    """
    return bool(row.get("engine_ok")) and (not judged or isinstance(row.get("scores"), list))


def write_checkpoint(directory: str | Path, rows: list[dict]) -> None:
    """Atomically write finished rows to ``directory`` (one file per batch)."""
    if not rows:
        return
    name = hashlib.sha256("\n".join(r["id"] for r in rows).encode()).hexdigest()[:16]
    write_text_atomic(Path(directory) / f"{name}.jsonl", "".join(
        json.dumps({k: row.get(k) for k in KEEP}, ensure_ascii=False) + "\n" for row in rows))


class SplitThoughts(Step):
    """Split each sample at the response separator; flag parse failures and truncated samples.

    ``truncated`` is True where the engine stopped a sample at the token limit
    (OpenAI's finish reason "length"), None where the engine did not say.
    """

    separator: str | None = None
    thought_marker: str | None = None

    @property
    def inputs(self) -> list[str]:
        return ["generation"]

    @property
    def outputs(self) -> list[str]:
        return ["thoughts", "responses", "parsed", "truncated", "engine_ok"]

    def process(self, inputs: StepInput) -> "StepOutput":  # type: ignore[override]
        for row in inputs:
            samples = row.get("generation")
            ok = isinstance(samples, list) and bool(samples) and all(
                isinstance(s, str) for s in samples
            )
            splits = [split_output(s, self.separator, self.thought_marker) for s in samples] if ok else []
            row["engine_ok"] = ok
            row["thoughts"] = [s.thought for s in splits]
            row["responses"] = [s.response for s in splits]
            row["parsed"] = [s.parsed for s in splits]
            reasons = row.pop(FINISH_COLUMN, None)
            if not (ok and isinstance(reasons, list) and len(reasons) == len(samples)):
                reasons = [None] * len(splits)
            row["truncated"] = [None if r is None else r == "length" for r in reasons]
        yield inputs


class CheckpointRows(Step):
    """Last step: write the batch's finished rows to ``checkpoint_dir``, pass everything on."""

    checkpoint_dir: str
    judged: bool = False

    @property
    def inputs(self) -> list[str]:
        return ["id"]

    def process(self, inputs: StepInput) -> "StepOutput":  # type: ignore[override]
        write_checkpoint(self.checkpoint_dir, [r for r in inputs if is_finished(r, self.judged)])
        yield inputs

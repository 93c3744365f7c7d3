"""PIT (implicit self-improvement, METHOD.md 2): pure logic, no I/O.

- The improvement prompt: instruction x and reference answer y_ref in, "write a
  better answer" out. :func:`improvement_prompt` and :func:`parse_improvement_prompt`
  round-trip exactly.
- Improvement rows (x, y_ref, y_better) from preference rows: TRL conversational
  (explicit or implicit prompt), plain text (with a prompt column, or Anthropic
  HH-RLHF style ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``), or our TPO ``pairs``
  config, where the *responses* are used and the thoughts dropped: PIT improves
  answers, and the judge never saw the thoughts either.
- The gap reward model's training signal: per (x, y_w, y_l) four inputs
  (w,l), (w,w), (l,l), (l,w), ordered R(w,l) > R(w,w) = R(l,l) > R(l,w), trained
  with five pairwise ranking terms (:func:`gap_ranking_loss`).
- The stop rule for repeated improvement (:func:`should_stop`).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tpo_data.errors import TPODataError

if TYPE_CHECKING:
    import torch

# --- the improvement prompt ------------------------------------------------------------

IMPROVE_HEADER = (
    "Below are an instruction and a reference answer to it. Write a new answer to the "
    "instruction that is better than the reference answer: more helpful, more accurate and "
    "harmless. Reply with the new answer only."
)
_INSTRUCTION_OPEN = "<instruction>\n"
# The first occurrence of this boundary ends the instruction, so the instruction must not
# contain it; the reference may contain anything.
_BOUNDARY = "\n</instruction>\n\n<reference_answer>\n"
_REFERENCE_CLOSE = "\n</reference_answer>"
_PROMPT_RE = re.compile(
    "^" + re.escape(IMPROVE_HEADER + "\n\n" + _INSTRUCTION_OPEN) + "(.*?)" + re.escape(_BOUNDARY)
    + "(.*)" + re.escape(_REFERENCE_CLOSE) + r"\Z",
    re.DOTALL,
)


def improvement_prompt(instruction: str, reference: str) -> str:
    """The user message asking for an answer better than ``reference``."""
    if _BOUNDARY in instruction:
        raise TPODataError(
            "The instruction contains the improvement prompt's own boundary "
            f"{_BOUNDARY.strip()!r}, so it could not be parsed back.",
            "Remove that text from the instruction (build_improvement_rows skips such rows).",
        )
    return f"{IMPROVE_HEADER}\n\n{_INSTRUCTION_OPEN}{instruction}{_BOUNDARY}{reference}{_REFERENCE_CLOSE}"


def parse_improvement_prompt(text: str) -> tuple[str, str] | None:
    """(instruction, reference) from an improvement prompt, or None if ``text`` is not one."""
    match = _PROMPT_RE.match(text)
    return (match.group(1), match.group(2)) if match else None


def improvement_messages(instruction: str, reference: str) -> list[dict[str, str]]:
    """The improvement prompt as a one-turn TRL conversational prompt."""
    return [{"role": "user", "content": improvement_prompt(instruction, reference)}]


# --- preference rows -> improvement rows -------------------------------------------------

HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"


@dataclass(frozen=True)
class Preference:
    """One preference triple (x, y_w, y_l) reduced to text."""

    instruction: str
    chosen: str
    rejected: str
    id: str


def render_conversation(messages: list[dict[str, Any]]) -> str:
    """The instruction text of a prompt: a lone user turn as is, a dialogue as ``Role: text`` blocks."""
    if len(messages) == 1 and messages[0].get("role") == "user":
        return str(messages[0]["content"])
    return "\n\n".join(f"{str(m['role']).capitalize()}: {m['content']}" for m in messages)


def _last_assistant(messages: Any, column: str) -> str:
    if not isinstance(messages, list) or not messages or messages[-1].get("role") != "assistant":
        raise ValueError(f"{column} does not end with an assistant message")
    return str(messages[-1]["content"])


def _split_hh(text: str) -> tuple[str, str]:
    """(dialogue before the last assistant turn, last assistant answer) of an HH-RLHF string."""
    cut = text.rfind(HH_ASSISTANT)
    if cut < 0:
        raise ValueError("no '\\n\\nAssistant:' turn")
    dialogue = text[:cut].replace(HH_HUMAN, "\n\nUser:").replace(HH_ASSISTANT, "\n\nAssistant:")
    dialogue = dialogue.strip()
    # A single human turn is just the instruction.
    if dialogue.startswith("User:") and "\n\nAssistant:" not in dialogue:
        dialogue = dialogue[len("User:"):].strip()
    return dialogue, text[cut + len(HH_ASSISTANT):].strip()


def _row_id(row: dict[str, Any], instruction: str, chosen: str, rejected: str) -> str:
    for key in ("instruction_id", "id"):
        if row.get(key) not in (None, ""):
            return str(row[key])
    digest = hashlib.sha256("\x00".join((instruction, chosen, rejected)).encode()).hexdigest()
    return digest[:16]


def preference_from_row(row: dict[str, Any]) -> Preference:
    """Read (x, y_w, y_l) from one preference row of any supported layout; ValueError if none fits."""
    if "chosen_response" in row and "instruction" in row:  # our TPO `pairs` config
        # A parse failure kept as the rejected sample has no response: it becomes an "empty" drop.
        instruction = row["instruction"]
        chosen, rejected = row["chosen_response"] or "", row["rejected_response"] or ""
    elif "chosen" in row and "rejected" in row:
        c, r, prompt = row["chosen"], row["rejected"], row.get("prompt")
        if isinstance(c, list):
            chosen, rejected = _last_assistant(c, "chosen"), _last_assistant(r, "rejected")
            if isinstance(prompt, list):
                # distilabel also writes the user turn into chosen/rejected: the prompt column wins.
                messages = prompt
            elif isinstance(prompt, str):
                messages = [{"role": "user", "content": prompt}]
            else:  # implicit prompt: everything before the final assistant turn
                messages = c[:-1]
            if not messages:
                raise ValueError("no prompt messages")
            instruction = render_conversation(messages)
        elif isinstance(c, str) and isinstance(prompt, str):
            instruction, chosen, rejected = prompt, c, r
        elif isinstance(c, str):
            instruction, chosen = _split_hh(c)
            other, rejected = _split_hh(r)
            if other != instruction:
                raise ValueError("chosen and rejected continue different dialogues")
        else:
            raise ValueError("chosen is neither text nor a list of messages")
    else:
        raise ValueError("needs prompt/chosen/rejected or instruction/chosen_response/rejected_response")
    if not all(isinstance(v, str) for v in (instruction, chosen, rejected)):
        raise ValueError("instruction, chosen and rejected must be text")
    return Preference(instruction.strip(), chosen.strip(), rejected.strip(),
                      _row_id(row, instruction, chosen, rejected))


def improvement_row(pref: Preference) -> dict[str, Any]:
    """One SFT row: prompt (x, y_ref = y_l) -> completion y_better = y_w, plus the plain texts."""
    return {
        "id": pref.id,
        "instruction": pref.instruction,
        "reference": pref.rejected,
        "better": pref.chosen,
        "prompt": improvement_messages(pref.instruction, pref.rejected),
        "completion": [{"role": "assistant", "content": pref.chosen}],
    }


def build_improvement_rows(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Improvement rows from preference rows, and the count of rows dropped per reason.

    Dropped: rows no layout fits (``unreadable``), an empty answer or instruction
    (``empty``; also a TPO pair whose rejected sample is a parse failure), chosen ==
    rejected (``identical``: nothing to learn), an instruction holding the prompt's
    boundary (``boundary``), and repeats of an id (``duplicate``).
    """
    kept: list[dict[str, Any]] = []
    seen: set[str] = set()
    drops = dict.fromkeys(("unreadable", "empty", "identical", "boundary", "duplicate"), 0)
    for row in rows:
        try:
            pref = preference_from_row(row)
        except (ValueError, KeyError, TypeError, AttributeError):
            drops["unreadable"] += 1
            continue
        if not (pref.instruction and pref.chosen and pref.rejected):
            drops["empty"] += 1
        elif pref.chosen == pref.rejected:
            drops["identical"] += 1
        elif _BOUNDARY in pref.instruction:
            drops["boundary"] += 1
        elif pref.id in seen:
            drops["duplicate"] += 1
        else:
            seen.add(pref.id)
            kept.append(improvement_row(pref))
    return kept, drops


# --- the gap reward model ----------------------------------------------------------------

GAP_FORMAT = (
    "Instruction:\n{instruction}\n\nAnswer A:\n{first}\n\nAnswer B:\n{second}\n\n"
    "How much better is answer A than answer B?"
)

# The four inputs per (x, y_w, y_l), in this order: (y1, y2) as indices into (y_w, y_l).
GAP_INPUTS = (("w", "l"), ("w", "w"), ("l", "l"), ("l", "w"))
# METHOD.md 2.2's five terms as (higher, lower) indices into GAP_INPUTS:
# (w,l)>(w,w), (w,l)>(l,l), (w,l)>(l,w), (w,w)>(l,w), (l,l)>(l,w).
GAP_RANKING_PAIRS = ((0, 1), (0, 2), (0, 3), (1, 3), (2, 3))


def gap_text(instruction: str, first: str, second: str) -> str:
    """What the gap reward model reads to score R(x, first, second)."""
    return GAP_FORMAT.format(instruction=instruction, first=first, second=second)


def gap_inputs(instruction: str, chosen: str, rejected: str) -> list[str]:
    """The texts for R(w,l), R(w,w), R(l,l), R(l,w), in that order."""
    answers = {"w": chosen, "l": rejected}
    return [gap_text(instruction, answers[a], answers[b]) for a, b in GAP_INPUTS]


def gap_ranking_loss(r_wl: torch.Tensor, r_ww: torch.Tensor, r_ll: torch.Tensor,
                     r_lw: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the sum of the five pairwise ranking terms.

    Each term is the Bradley-Terry logistic loss ``-logsigmoid(R_high - R_low)`` used for
    ordinary reward models. The terms are summed, not averaged, so each ordering counts
    as one reward-model comparison. The paper's equality R(w,w) = R(l,l) gets no term of
    its own: both are pushed below R(w,l) and above R(l,w), which puts them in the middle
    class; an extra term would only fix an offset between two equally-good inputs.
    Every term is a difference, so the loss is blind to a constant shift: R(x, y, y) need
    not be 0, and a gap is read against it (``GapRewardModel.calibrated_gap``). RL is
    unaffected, since RLOO compares completions that share x and y_ref.
    """
    import torch.nn.functional as F

    scores = (r_wl, r_ww, r_ll, r_lw)
    terms = [F.logsigmoid(scores[high] - scores[low]) for high, low in GAP_RANKING_PAIRS]
    return -sum(terms).mean()


# --- repeated improvement ----------------------------------------------------------------


def should_stop(gap_new_vs_last: float, round: int, max_rounds: int, threshold: float = 0.0) -> bool:
    """Whether to stop improving after ``round`` (1-based) produced an answer with this gap.

    Stop when the gap reward says the new answer is not better than the last one
    (calibrated gap R(x, new, last) - R(x, last, last) <= threshold; NaN counts as not
    better), or when ``max_rounds`` rounds are done. The paper leaves the rule open
    (METHOD.md 2.5): quality does not rise monotonically with rounds, so we stop at the
    first round that does not help.
    """
    if max_rounds < 1 or round < 1:
        raise TPODataError(
            f"round={round} and max_rounds={max_rounds} must be at least 1.",
            "Count rounds from 1 and allow at least one round.",
        )
    return math.isnan(gap_new_vs_last) or gap_new_vs_last <= threshold or round >= max_rounds


__all__ = [
    "GAP_INPUTS",
    "GAP_RANKING_PAIRS",
    "IMPROVE_HEADER",
    "Preference",
    "build_improvement_rows",
    "gap_inputs",
    "gap_ranking_loss",
    "gap_text",
    "improvement_messages",
    "improvement_prompt",
    "improvement_row",
    "parse_improvement_prompt",
    "preference_from_row",
    "render_conversation",
    "should_stop",
]

"""PIT inference (repeated improvement with a stop rule) and its evaluation.

Inference (METHOD.md 2.5): y_k = PIT(x, y_{k-1}), starting from the policy's answer
y_0. After each rewrite the gap reward model scores R(x, y_k, y_{k-1}) - R(x, y_{k-1}, y_{k-1})
(:meth:`~tpo_data.pit_training.GapRewardModel.calibrated_gap`: 0 means "no better"); a
rewrite is kept only when that gap is above the threshold, and the loop stops at the first rewrite
that is not better, or after ``max_rounds`` (:func:`tpo_data.pit.should_stop`). The
result is the last kept answer, which by construction beat every answer before it.

Evaluation (:func:`evaluate`), on held-out instructions, with a judge that is NOT the gap
reward model (any point-wise :class:`~tpo_data.reward_models.RewardModelScorer`):

- per round k (every item rewritten k times, no stop rule): the share of y_k that beat
  the answer they improved, y_{k-1}, and the share that beat y_0;
- the same for Self-Refine-style prompting ("improve this answer") of a comparison
  model, with the same number of model calls per item (one per round, after y_0);
- the PIT answer chosen by the stop rule against y_0, with its mean call count.

A win is a strictly higher judge score; a tie counts one half (identical rewrites are common
with small models, and counting them as losses would understate both methods alike).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tpo_data.errors import TPODataError
from tpo_data.pit import improvement_messages, should_stop

SELF_REFINE_PROMPT = (
    "Here is an instruction and an answer to it. Improve this answer: make it more helpful, "
    "more accurate and harmless. Reply with the improved answer only.\n\n"
    "Instruction:\n{instruction}\n\nAnswer:\n{answer}"
)


def self_refine_messages(instruction: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": SELF_REFINE_PROMPT.format(instruction=instruction, answer=answer)}]


class ChatModel:
    """A local chat model answering message lists in batches (``BatchedTransformersLLM``)."""

    def __init__(self, model: str, *, temperature: float = 0.5, top_p: float = 0.95,
                 max_new_tokens: int = 256, seed: int = 0, what: str = "--model"):
        from tpo_data.engines import BatchedTransformersLLM
        from tpo_data.pit_training import model_path

        self.name = model
        self.llm = BatchedTransformersLLM(model=model_path(model, what), seed=seed)
        self.llm.load()
        self.kwargs = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}

    def __call__(self, conversations: Sequence[list[dict[str, str]]]) -> list[str]:
        if not conversations:
            return []
        outputs = self.llm.generate(list(conversations), num_generations=1, **self.kwargs)
        return [(out["generations"][0] or "").strip() for out in outputs]


@dataclass
class ImproveResult:
    """One item's improvement history: every rewrite, its gap over the answer it rewrote, kept or not."""

    instruction: str
    initial: str
    rewrites: list[str] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    kept: list[bool] = field(default_factory=list)

    @property
    def best(self) -> str:
        kept = [r for r, k in zip(self.rewrites, self.kept) if k]
        return kept[-1] if kept else self.initial

    @property
    def calls(self) -> int:
        return len(self.rewrites)


def improve_many(instructions: Sequence[str], answers: Sequence[str], pit: Any, gap_model: Any,
                 max_rounds: int = 3, threshold: float = 0.0) -> list[ImproveResult]:
    """Improve every (x, y_0) with the stop rule; items still improving are batched per round."""
    results = [ImproveResult(x, y) for x, y in zip(instructions, answers, strict=True)]
    current = list(answers)
    active = list(range(len(results)))
    for round_number in range(1, max_rounds + 1):
        if not active:
            break
        new = pit([improvement_messages(results[i].instruction, current[i]) for i in active])
        gaps = gap_model.calibrated_gap([results[i].instruction for i in active], new,
                                        [current[i] for i in active])
        still = []
        for i, text, gap in zip(active, new, gaps):
            better = not math.isnan(gap) and gap > threshold
            results[i].rewrites.append(text)
            results[i].gaps.append(gap)
            results[i].kept.append(better)
            if better:
                current[i] = text
            if not should_stop(gap, round_number, max_rounds, threshold):
                still.append(i)
        active = still
    return results


def _win_share(judge: Any, instructions: Sequence[str], new: Sequence[str], old: Sequence[str]) -> float:
    scores = judge.score(list(instructions) * 2, list(new) + list(old))
    a, b = scores[: len(new)], scores[len(new):]
    wins = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b))
    return wins / len(new)


def _rounds(generate: Any, prompt: Any, instructions: Sequence[str], initial: Sequence[str],
            rounds: int) -> list[list[str]]:
    """Answers after 1..rounds rewrites, each rewriting the previous one (no stop rule)."""
    history = [list(initial)]
    for _ in range(rounds):
        history.append(generate([prompt(x, y) for x, y in zip(instructions, history[-1])]))
    return history


def evaluate(instructions: Sequence[str], initial: Sequence[str], pit: Any, gap_model: Any, judge: Any,
             self_refine: Any | None = None, rounds: int = 2, threshold: float = 0.0) -> dict[str, Any]:
    """PIT per round, PIT with the stop rule, and Self-Refine at equal calls, judged by ``judge``.

    ``pit``/``self_refine`` map message lists to answers (:class:`ChatModel`); ``gap_model``
    has ``calibrated_gap(x, new, last)``; ``judge`` has ``score(x, y)`` and must not be the gap model.
    """
    if not instructions:
        raise TPODataError("No held-out items to evaluate.", "Use a version whose 'test' config has rows.")
    if judge is gap_model:
        raise TPODataError("The judge is the gap reward model PIT was trained against.",
                           "Judge with an independent point-wise reward model (--judge_model).")
    report: dict[str, Any] = {"items": len(instructions), "rounds": rounds}
    methods = {"pit": (pit, improvement_messages)}
    if self_refine is not None:
        methods["self_refine"] = (self_refine, self_refine_messages)
    histories = {}
    for name, (generate, prompt) in methods.items():
        history = _rounds(generate, prompt, instructions, initial, rounds)
        histories[name] = history
        report[name] = [{
            "round": k,
            "calls_per_item": k + 1,  # y_0 plus one rewrite per round
            "beat_previous": _win_share(judge, instructions, history[k], history[k - 1]),
            "beat_initial": _win_share(judge, instructions, history[k], history[0]),
        } for k in range(1, rounds + 1)]
    if self_refine is not None:
        report["pit_vs_self_refine"] = [
            {"round": k, "pit_wins": _win_share(judge, instructions, histories["pit"][k], histories["self_refine"][k])}
            for k in range(1, rounds + 1)]
    stopped = improve_many(instructions, initial, pit, gap_model, max_rounds=rounds, threshold=threshold)
    report["pit_stop_rule"] = {
        "beat_initial": _win_share(judge, instructions, [r.best for r in stopped], initial),
        "calls_per_item": 1 + sum(r.calls for r in stopped) / len(stopped),
        "changed": sum(r.best != r.initial for r in stopped) / len(stopped),
    }
    return report


def format_report(report: dict[str, Any]) -> str:
    """The evaluation as a few plain lines."""
    lines = [f"{report['items']} held-out items, {report['rounds']} rounds (wins; ties count 1/2)"]
    for name in ("pit", "self_refine"):
        for row in report.get(name, []):
            lines.append(f"{name:12s} round {row['round']} ({row['calls_per_item']} calls): "
                         f"beats previous {row['beat_previous']:.3f}, beats y0 {row['beat_initial']:.3f}")
    for row in report.get("pit_vs_self_refine", []):
        lines.append(f"pit vs self_refine round {row['round']}: pit wins {row['pit_wins']:.3f}")
    stop = report["pit_stop_rule"]
    lines.append(f"pit + stop rule: beats y0 {stop['beat_initial']:.3f}, "
                 f"{stop['calls_per_item']:.2f} calls per item, answer changed for {stop['changed']:.3f}")
    return "\n".join(lines)

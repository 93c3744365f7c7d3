"""From judged samples to the iteration's datasets (docs/SCHEMA.md) and statistics.

After the pipeline, over all instructions of the iteration: pick rho (fixed,
or ``scoring.auto_rho``), select one pair per instruction with
``pairs.select_pairs`` (length control, parse failures as rejected, drops
with reasons), then lay out

- ``pairs``: TRL conversational preference rows. ``prompt`` is what the
  policy saw (thought prompt + instruction), chosen/rejected hold the full
  raw generation (thought + separator + response), so DPO trains the thought
  too (METHOD.md 1.6);
- ``candidates``: every sample with its split, raw and normalized score;
- run statistics for the log and the store.

A sample's length is its response length in characters; a parse failure has
no response, so its whole raw output counts: that is what a reader sees
(``auto_rho`` leaves pairs that reject a parse failure or a truncated sample out of its condition).

A sample is truncated when the engine reported that it stopped at the token
limit (``steps.SplitThoughts``); under ``reject_truncated`` (the default) such
samples are never chosen. Rows generated before the flag existed count as
not truncated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tpo_data.errors import TPODataError
from tpo_data.judges import JudgeArguments
from tpo_data.pairs import DROP_NON_FINITE, DROP_NO_VERDICT, select_pairs, summarize
from tpo_data.prompts import ThoughtPrompt
from tpo_data.scoring import auto_rho, check_finite, length_controlled, position_biased
from tpo_data.steps import JUDGE_COUNTERS

if TYPE_CHECKING:
    import datasets


@dataclass
class IterationData:
    pairs: list[dict[str, Any]]
    candidates: list[dict[str, Any]]
    stats: dict[str, Any]


def sample_lengths(row: dict) -> list[int]:
    """Characters of each sample's response (of the raw output for a parse failure)."""
    return [len(response) if ok else len(generation)
            for generation, response, ok in zip(row["generation"], row["responses"], row["parsed"])]


def _flags(row: dict) -> list[bool | None]:
    # Rows generated before the flag existed have none: every sample unknown.
    return row.get("truncated") or [None] * len(row["generation"])


def truncated(row: dict) -> list[bool]:
    """Whether each sample stopped at the token limit (False where unknown)."""
    return [bool(flag) for flag in _flags(row)]


def unknown_truncation(row: dict) -> int:
    """Samples of ``row`` whose finish reason is unknown (older rows, engines that give none)."""
    return sum(flag is None for flag in _flags(row))


def _selection_cut(row: dict, judge: JudgeArguments) -> list[bool]:
    """The truncated mask selection applies: the flags under ``reject_truncated``, else none."""
    return truncated(row) if judge.reject_truncated else [False] * len(row["parsed"])


def _scores(row: dict) -> list[float]:
    # None (parse failure, no score) becomes NaN; select_pair ignores unparsed entries.
    return [math.nan if s is None else float(s) for s in row["scores"]]


def _undecided(row: dict) -> bool:
    """Whether a pair-wise judge made calls for ``row`` and none decided (all ties or unparsable)."""
    calls = row.get("judge_calls") or 0
    return calls > 0 and (row.get("judge_unparsable") or 0) == calls


def _finite_or_none(score: float | None) -> float | None:
    # A NaN score (judge failure) is stored as null: no usable score, like a parse failure.
    return score if score is not None and math.isfinite(score) else None


def _norm_scores(row: dict, rho: float, judge: JudgeArguments) -> list[float | None]:
    """Length-controlled s of the valid samples, as selection saw them (None when not computable)."""
    valid = [i for i, (ok, cut) in enumerate(zip(row["parsed"], _selection_cut(row, judge))) if ok and not cut]
    values = [_scores(row)[i] for i in valid]
    norm: list[float | None] = [None] * len(row["parsed"])
    if valid and check_finite(values).all():
        lengths = sample_lengths(row)
        for i, s in zip(valid, length_controlled(values, [lengths[i] for i in valid], rho)):
            norm[i] = float(s)
    return norm


def build_iteration_data(rows: list[dict], prompt: ThoughtPrompt, judge: JudgeArguments,
                         iteration: int) -> IterationData:
    """Pairs, candidates and statistics for judged ledger rows (one row per instruction)."""
    unjudged = [row["id"] for row in rows if not isinstance(row.get("scores"), list)]
    if unjudged:
        raise TPODataError(
            f"{len(unjudged)} instruction(s) have no judge scores (first: {unjudged[0]}).",
            "Rerun the iteration with a judge (--judge pairwise or reward_model); only the "
            "unjudged instructions are processed again.",
        )
    groups = [(_scores(r), sample_lengths(r), r["parsed"], _selection_cut(r, judge)) for r in rows]
    fixed = judge.rho_value()
    options = {"reject_parse_failures": judge.reject_parse_failures,
               "length_breaks_ties": judge.length_breaks_ties}
    auto = None if fixed is not None else auto_rho(groups, **options)
    rho = fixed if auto is None else auto.rho
    selection = select_pairs(groups, rho, **options)
    if judge.judge == "pairwise":  # a reward model's NaN is a non-finite score, not a missing verdict
        selection = selection.relabel({i: DROP_NO_VERDICT for i, reason in selection.dropped
                                       if reason == DROP_NON_FINITE and _undecided(rows[i])})

    pairs = []
    for index, choice in selection.pairs:
        row = rows[index]
        c, r = choice.chosen, choice.rejected
        pairs.append({
            "prompt": prompt.messages(row["instruction"]),
            "chosen": [{"role": "assistant", "content": row["generation"][c]}],
            "rejected": [{"role": "assistant", "content": row["generation"][r]}],
            "instruction_id": row["id"],
            "instruction": row["instruction"],
            "category": row["category"],
            "chosen_thought": row["thoughts"][c],
            "chosen_response": row["responses"][c],
            "rejected_thought": row["thoughts"][r],
            "rejected_response": row["responses"][r],
            "chosen_score": choice.chosen_score,
            "rejected_score": choice.rejected_score,
            "chosen_length": choice.chosen_length,
            "rejected_length": choice.rejected_length,
            "score_gap": choice.score_gap,
            "rho": rho,
            "iteration": iteration,
        })

    candidates = []
    for row in rows:
        lengths, norm, cut = sample_lengths(row), _norm_scores(row, rho, judge), truncated(row)
        for k, generation in enumerate(row["generation"]):
            candidates.append({
                "instruction_id": row["id"],
                "instruction": row["instruction"],
                "category": row["category"],
                "sample_index": k,
                "generation": generation,
                "thought": row["thoughts"][k],
                "response": row["responses"][k],
                "parsed": bool(row["parsed"][k]),
                "truncated": cut[k],
                "score": _finite_or_none(row["scores"][k]),
                "length": lengths[k],
                "norm_score": norm[k],
                "iteration": iteration,
            })

    stats = summarize(selection)
    cut = [truncated(r) for r in rows]
    stats.update({
        "truncated_samples": sum(map(sum, cut)),
        "truncated_parsed": sum(c and bool(ok) for r, flags in zip(rows, cut)
                                for c, ok in zip(flags, r["parsed"])),
        "chosen_truncated": sum(cut[i][p.chosen] for i, p in selection.pairs),
        "rejected_truncated": sum(cut[i][p.rejected] for i, p in selection.pairs),
        "truncation_unknown": sum(unknown_truncation(r) for r in rows),
        "reject_truncated": judge.reject_truncated,
        "rho_mode": "auto" if auto else "fixed",
        "rho_auto_satisfied": auto.satisfied if auto else None,
        "judge": judge.judge,
        "judge_mode": judge.judge_mode if judge.judge == "pairwise" else None,
        # Rows judged before a counter existed lack it: they count 0.
        **{counter: sum(r.get(counter) or 0 for r in rows) for counter in JUDGE_COUNTERS},
    })
    return IterationData(pairs, candidates, stats)


def _features() -> tuple[datasets.Features, datasets.Features]:
    from datasets import Features, List, Value

    message = List({"role": Value("string"), "content": Value("string")})
    pairs = Features({
        "prompt": message, "chosen": message, "rejected": message,
        **{k: Value("string") for k in ("instruction_id", "instruction", "category", "chosen_thought",
                                        "chosen_response", "rejected_thought", "rejected_response")},
        **{k: Value("float64") for k in ("chosen_score", "rejected_score")},
        **{k: Value("int64") for k in ("chosen_length", "rejected_length")},
        "score_gap": Value("float64"), "rho": Value("float64"), "iteration": Value("int64"),
    })
    candidates = Features({
        **{k: Value("string") for k in ("instruction_id", "instruction", "category")},
        "sample_index": Value("int64"),
        **{k: Value("string") for k in ("generation", "thought", "response")},
        "parsed": Value("bool"), "truncated": Value("bool"), "score": Value("float64"),
        "length": Value("int64"),
        "norm_score": Value("float64"), "iteration": Value("int64"),
    })
    return pairs, candidates


def to_datasets(data: IterationData) -> tuple[datasets.Dataset, datasets.Dataset]:
    """``pairs`` and ``candidates`` with a fixed schema (also when no pair was kept)."""
    from datasets import Dataset

    def table(rows: list[dict], features: datasets.Features) -> datasets.Dataset:
        # from_dict, not from_list: an empty list would lose the columns.
        return Dataset.from_dict({k: [row[k] for row in rows] for k in features}, features=features)

    pair_features, candidate_features = _features()
    return table(data.pairs, pair_features), table(data.candidates, candidate_features)


def format_stats(stats: dict[str, Any]) -> str:
    """The run statistics as the few lines ``main`` prints last."""
    drops = ", ".join(f"{k}={v}" for k, v in stats["drops"].items() if v) or "none"
    rho = f"{stats['rho']:g} ({stats['rho_mode']}"
    if stats["rho_mode"] == "auto" and stats["rho_auto_satisfied"] is None and stats["pairs_kept"]:
        rho += (", not tuned: every pair rejects a parse failure or a truncated sample, whatever rho is, "
                "so no pair to compare")
    elif stats["rho_mode"] == "auto" and not stats["rho_auto_satisfied"]:
        rho += ", chosen still longer on average at the maximum" if stats["pairs_kept"] else ", no pair"
    judge = stats["judge"] + (f" ({stats['judge_mode']})" if stats.get("judge_mode") else "")
    # Statistics written before forced verdicts existed have no count.
    forced = f", {stats['judge_forced']} forced verdicts" if "judge_forced" in stats else ""
    n_cut = stats.get("judge_truncated")
    cut = f"; {n_cut} responses longer than the reward model's max_length, scored on their start only" if n_cut else ""
    return (
        f"Judge: {judge}, {stats['judge_calls']} calls, {stats['judge_unparsable']} tied or without a verdict"
        f"{forced}{cut}\n{_position_line(stats)}"
        f"Pairs kept: {stats['pairs_kept']}/{stats['instructions']} instructions "
        f"(parse rate {stats['parse_rate']:.1%}); dropped: {drops}\n"
        f"Rejected parse failures: {stats['rejected_parse_failures']}; rho: {rho})\n"
        f"{_truncation_line(stats)}"
        f"Mean response length: chosen {stats['mean_chosen_length']:.1f}, "
        f"rejected {stats['mean_rejected_length']:.1f} characters"
    )


def _truncation_line(stats: dict[str, Any]) -> str:
    """How many samples hit the token limit, and whether any became a chosen answer."""
    if "truncated_samples" not in stats:
        return ""  # statistics from before the flag existed
    unknown = stats["truncation_unknown"]
    if unknown == stats["samples"]:
        return "Truncated at max_new_tokens: unknown (the engine gave no finish reasons)\n"
    line = (f"Truncated at max_new_tokens: {stats['truncated_samples']} of {stats['samples']} samples "
            f"({stats['truncated_parsed']} of them parsed"
            + (f"; unknown for {unknown}" if unknown else "") + ")")
    if stats["reject_truncated"]:
        line += f"; never chosen, {stats['rejected_truncated']} rejected"
    elif stats["chosen_truncated"]:
        line += (f"; {stats['chosen_truncated']} CHOSEN answers are cut off (reject_truncated is "
                 "false): DPO trains them as better answers; raise --max_new_tokens or set "
                 "--reject_truncated true")
    return line + "\n"


def _position_line(stats: dict[str, Any]) -> str:
    """How often the response shown first won, and what a position-biased judge means for the pairs."""
    if stats["judge"] != "pairwise" or "judge_first_wins" not in stats:
        return ""  # reward models have no positions; older statistics have no count
    first, decided = stats["judge_first_wins"], stats["judge_calls"] - stats["judge_unparsable"]
    if not decided:
        return ""
    line = f"Position: response A (shown first) won {first} of {decided} decided calls ({first / decided:.0%})"
    if not position_biased(first, decided):
        return line + "\n"
    if stats["judge_mode"] == "tournament":
        return line + (": POSITION-BIASED judge. Tournament matches judged in one order are decided "
                       "by position, not quality; use --judge_mode round_robin (both orders cancel "
                       "the bias) or a stronger judge.\n")
    return line + (": position-biased judge. Round robin judges both orders, so the bias cancels, but "
                   "samples are told apart only where the verdict survives the swap.\n")

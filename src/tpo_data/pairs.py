"""Choose one (chosen, rejected) pair per instruction from its K scored samples.

Rules (METHOD.md 1.5-1.6, and our choices where the paper is silent):

- Valid samples are the parsed ones (thought/response separator found),
  less, when a ``truncated`` mask is given, those cut off at the token limit
  (a response that stops mid-sentence must not be trained as the better
  answer). Length-control z-scores are computed over the valid samples only.
- chosen = argmax s over valid samples; a parse failure is never chosen.
- A parse failure counts as worse than every valid sample ("parse failures
  are allowed as rejected samples"): when there is one, the rejected sample
  is a parse failure, which teaches the model to keep the format. Else a
  truncated sample, when there is one, is rejected: the one the judge scored
  lowest (teaching the model to finish). Pass ``reject_parse_failures=False``
  to ignore such invalid samples instead.
- Otherwise rejected = argmin s over valid samples.
- Ties break to the lowest sample index (for chosen, rejected, and the
  parse failure that is rejected), so results are reproducible.
- An instruction is dropped, with a reason, when no pair exists:
  ``single_sample`` (K = 1), ``non_finite_score`` (a valid sample has a
  NaN/inf score: the judge misbehaved on this instruction; the caller relabels
  it ``no_verdict`` when a pair-wise judge decided none of its calls, see
  :meth:`Selection.relabel`),
  ``no_valid_candidate`` (nothing parsed), ``all_truncated`` (samples
  parsed, but every one was cut off at the token limit), ``all_equal`` (the judge scored
  every valid sample the same and there is no parse failure to reject; with
  ``length_breaks_ties`` length control alone may still separate them, else
  they are dropped), ``single_valid``
  (one valid sample and invalid samples are not rejected).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from tpo_data.errors import TPODataError
from tpo_data.scoring import Group, check_finite, length_controlled, no_spread, validate_rho

DROP_SINGLE_SAMPLE = "single_sample"
DROP_NON_FINITE = "non_finite_score"
DROP_NO_VALID = "no_valid_candidate"
DROP_ALL_EQUAL = "all_equal"
DROP_SINGLE_VALID = "single_valid"
DROP_ALL_TRUNCATED = "all_truncated"
DROP_NO_VERDICT = "no_verdict"
DROP_REASONS = (DROP_SINGLE_SAMPLE, DROP_NON_FINITE, DROP_NO_VERDICT, DROP_NO_VALID, DROP_ALL_TRUNCATED,
                DROP_ALL_EQUAL, DROP_SINGLE_VALID)

# Length-controlled scores closer than this are equal (z-scores are O(1); a
# Bradley-Terry fit leaves ~1e-16 between samples with identical records).
_EQUAL_ATOL = 1e-9


@dataclass(frozen=True)
class PairChoice:
    """The pair for one instruction; indices are sample indices within the instruction.

    ``norm_scores`` holds the length-controlled score s of every sample (None
    for samples that were not valid). ``rejected_score`` is None when the
    rejected sample is a parse failure (it has no judge score); ``score_gap``
    whenever the rejected sample is not valid (parse failure or truncated).
    """

    chosen: int
    rejected: int
    rejected_parsed: bool
    rejected_truncated: bool
    chosen_score: float
    rejected_score: float | None
    chosen_length: int
    rejected_length: int
    score_gap: float | None
    norm_scores: tuple[float | None, ...]


@dataclass(frozen=True)
class Drop:
    """No pair for this instruction; ``reason`` is one of DROP_REASONS."""

    reason: str


def select_pair(
    scores: Sequence[float] | np.ndarray,
    lengths: Sequence[float] | np.ndarray,
    parsed: Sequence[bool] | np.ndarray,
    rho: float,
    *,
    reject_parse_failures: bool = True,
    length_breaks_ties: bool = False,
    truncated: Sequence[bool] | np.ndarray | None = None,
) -> PairChoice | Drop:
    """Pick chosen and rejected among one instruction's samples (rules in the module docstring).

    ``scores`` are raw judge scores (RM scalars or Bradley-Terry strengths;
    entries of invalid samples are ignored and may be NaN or None),
    ``lengths`` response lengths in characters, ``parsed`` the parse mask,
    ``truncated`` (optional) marks samples that hit the token limit.
    """
    rho = validate_rho(rho)
    sc = np.asarray(scores, dtype=float)
    ln = np.asarray(lengths, dtype=float)
    parsed_mask = np.asarray(parsed, dtype=bool)
    cut = np.zeros_like(parsed_mask) if truncated is None else np.asarray(truncated, dtype=bool)
    if sc.ndim != 1 or len({sc.shape, ln.shape, parsed_mask.shape, cut.shape}) != 1:
        raise TPODataError(
            f"Scores {sc.shape}, lengths {ln.shape}, parsed {parsed_mask.shape} and truncated "
            f"{cut.shape} differ in shape.",
            "Pass one score, one length, one parsed and one truncated flag per sample of the instruction.",
        )
    if sc.size == 0:
        raise TPODataError("An instruction has no samples.", "Generate at least two samples per instruction.")
    if sc.size == 1:
        return Drop(DROP_SINGLE_SAMPLE)
    ok = parsed_mask & ~cut
    if not check_finite(sc[ok]).all():
        return Drop(DROP_NON_FINITE)
    valid = np.flatnonzero(ok)
    if not parsed_mask.any():
        return Drop(DROP_NO_VALID)
    if valid.size == 0:
        return Drop(DROP_ALL_TRUNCATED)
    rejectable = reject_parse_failures and not ok.all()
    if valid.size == 1 and not rejectable:
        return Drop(DROP_SINGLE_VALID)

    s = length_controlled(sc[valid], ln[valid], rho)
    # Ties (equal up to float noise) go to the lowest index.
    best = int(np.flatnonzero(s >= s.max() - _EQUAL_ATOL)[0])
    chosen = int(valid[best])
    gap: float | None = None
    failed, cut_off = np.flatnonzero(~parsed_mask), np.flatnonzero(parsed_mask & cut)
    if rejectable and failed.size:
        rejected = int(failed[0])
    elif rejectable:
        # No usable score (NaN) counts as the worst.
        rejected = int(cut_off[np.argmin(np.nan_to_num(sc[cut_off], nan=-np.inf))])
    elif (no_spread(sc[valid]) and not length_breaks_ties) or np.ptp(s) <= _EQUAL_ATOL:
        return Drop(DROP_ALL_EQUAL)
    else:
        worst = int(np.flatnonzero(s <= s.min() + _EQUAL_ATOL)[0])
        if worst == best:  # spread within twice the tie tolerance: one sample ties both ends
            return Drop(DROP_ALL_EQUAL)
        rejected = int(valid[worst])
        gap = float(s[best] - s[worst])

    norm: list[float | None] = [None] * sc.size
    for i, v in zip(valid, s):
        norm[int(i)] = float(v)
    rejected_parsed = bool(parsed_mask[rejected])
    # A truncated rejected sample keeps the score the judge gave it, when usable.
    rejected_score = float(sc[rejected]) if rejected_parsed and math.isfinite(sc[rejected]) else None
    return PairChoice(
        chosen=chosen,
        rejected=rejected,
        rejected_parsed=rejected_parsed,
        rejected_truncated=bool(cut[rejected]),
        chosen_score=float(sc[chosen]),
        rejected_score=rejected_score,
        chosen_length=int(ln[chosen]),
        rejected_length=int(ln[rejected]),
        score_gap=gap,
        norm_scores=tuple(norm),
    )


@dataclass(frozen=True)
class Selection:
    """Pairs over many instructions: (instruction index, PairChoice) pairs, (index, reason) drops, and counts."""

    pairs: list[tuple[int, PairChoice]]
    dropped: list[tuple[int, str]]
    drops: Counter[str]
    rho: float
    n_instructions: int
    n_samples: int
    n_parsed: int

    def relabel(self, reasons: dict[int, str]) -> Selection:
        """The same selection with the drops of the instructions in ``reasons`` renamed.

        Selection sees only scores; the caller knows why a score is missing
        (a pair-wise judge that decided nothing has NaN strengths).
        """
        unknown = set(reasons.values()) - set(DROP_REASONS)
        not_dropped = set(reasons) - {i for i, _ in self.dropped}
        if unknown or not_dropped:
            raise ValueError(f"Cannot relabel: unknown reasons {sorted(unknown)}, "
                             f"instructions not dropped {sorted(not_dropped)}.")
        dropped = [(i, reasons.get(i, reason)) for i, reason in self.dropped]
        return replace(self, dropped=dropped, drops=Counter(reason for _, reason in dropped))


def select_pairs(groups: Sequence[Group], rho: float, *, reject_parse_failures: bool = True,
                 length_breaks_ties: bool = False) -> Selection:
    """Run :func:`select_pair` on every ``(scores, lengths, parsed[, truncated])`` group."""
    rho = validate_rho(rho)
    pairs: list[tuple[int, PairChoice]] = []
    dropped: list[tuple[int, str]] = []
    n_samples = n_parsed = 0
    for i, (scores, lengths, parsed, *truncated) in enumerate(groups):
        mask = np.asarray(parsed, dtype=bool)
        n_samples += mask.size
        n_parsed += int(mask.sum())
        choice = select_pair(scores, lengths, mask, rho, reject_parse_failures=reject_parse_failures,
                             length_breaks_ties=length_breaks_ties,
                             truncated=truncated[0] if truncated else None)
        if isinstance(choice, Drop):
            dropped.append((i, choice.reason))
        else:
            pairs.append((i, choice))
    drops = Counter(reason for _, reason in dropped)
    return Selection(pairs, dropped, drops, rho, len(groups), n_samples, n_parsed)


def summarize(selection: Selection) -> dict[str, Any]:
    """Plain-dict statistics for logs and dataset cards.

    Lengths are means over kept pairs (NaN when none); ``drops`` lists every
    reason, zero included, so reports have a fixed shape.
    """
    chosen = [p.chosen_length for _, p in selection.pairs]
    rejected = [p.rejected_length for _, p in selection.pairs]
    return {
        "instructions": selection.n_instructions,
        "samples": selection.n_samples,
        "parse_rate": selection.n_parsed / selection.n_samples if selection.n_samples else math.nan,
        "pairs_kept": len(selection.pairs),
        "drops": {reason: selection.drops.get(reason, 0) for reason in DROP_REASONS},
        "rejected_parse_failures": sum(not p.rejected_parsed for _, p in selection.pairs),
        "mean_chosen_length": float(np.mean(chosen)) if chosen else math.nan,
        "mean_rejected_length": float(np.mean(rejected)) if rejected else math.nan,
        "rho": selection.rho,
    }

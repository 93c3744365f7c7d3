"""Scores for the K samples of one instruction: pair-wise wins, Bradley-Terry, length control.

Pure numpy, no I/O. The pair-wise judge (Self-Taught Evaluator) gives one
verdict per ordered pair; :func:`win_matrix` turns verdicts into win counts
B_mn = [r^mn = +1] + [r^nm = -1] (METHOD.md 1.4) and :func:`bradley_terry`
fits strengths by maximum likelihood. :func:`length_controlled` applies the
paper's length control s = z(score) - rho * z(length) (METHOD.md 1.5), and
:func:`auto_rho` picks the smallest rho for which chosen responses are on
average not longer than rejected ones. :func:`position_biased` tells whether
a pair-wise judge's verdicts depend on which response it is shown first.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from tpo_data.errors import TPODataError

RHO_MAX = 0.5
DEFAULT_RHO_GRID = np.round(np.arange(0.0, RHO_MAX + 1e-9, 0.025), 3)
# Relative spread below which a quantity counts as constant: z-scores of
# float noise (e.g. the mean of equal values off by one ulp) would be +-1.
_ZERO_STD_RTOL = 1e-12

# A judge counts as position-biased when the response shown first wins at least
# this share of its decided calls (or at most 1 - it), more often than a judge
# without bias would by chance (two-sided binomial p < POSITION_BIAS_P): then a
# single-order verdict between close responses mostly reports the position.
POSITION_BIAS_MIN_SHARE = 0.7
POSITION_BIAS_P = 0.01

# One group per instruction: (judge scores, response lengths, valid mask).
_Values = Sequence[float] | np.ndarray
_Mask = Sequence[bool] | np.ndarray
# (scores, lengths, parsed) or (scores, lengths, parsed, truncated), one per instruction.
Group = tuple[_Values, _Values, _Mask] | tuple[_Values, _Values, _Mask, _Mask]


def win_matrix(k: int, judgments: Iterable[tuple[int, int, int]]) -> np.ndarray:
    """Win counts ``B[m, n]`` = how often candidate m beat candidate n.

    Each judgment ``(m, n, r)`` shows candidate m as A and n as B; r = +1 means
    A won, -1 means B won, 0 a tie or an unparsable verdict (adds nothing).
    Judging both orders (m, n) and (n, m) therefore adds up to 2 to
    ``B[m, n] + B[n, m]``; repeated judgments accumulate.
    """
    if k < 0:
        raise TPODataError(f"win_matrix got k={k} candidates.", "Pass the number of samples per instruction (k >= 0).")
    wins = np.zeros((k, k), dtype=float)
    for m, n, r in judgments:
        if not (0 <= m < k and 0 <= n < k) or m == n:
            raise TPODataError(
                f"Judgment ({m}, {n}, {r}) names a candidate outside 0..{k - 1} or compares one with itself.",
                "Pass (index shown as A, index shown as B, result) with two different indices below k.",
            )
        if r == 1:
            wins[m, n] += 1
        elif r == -1:
            wins[n, m] += 1
        elif r != 0:
            raise TPODataError(
                f"Judgment ({m}, {n}, {r}) has result {r!r}.",
                "Use +1 when A wins, -1 when B wins and 0 for a tie or an unparsable verdict.",
            )
    return wins


def bradley_terry(wins: np.ndarray, l2: float = 1e-3, max_iter: int = 100, tol: float = 1e-10) -> np.ndarray:
    """Maximum-likelihood Bradley-Terry log-strengths with mean zero.

    Maximizes ``sum_mn B[m, n] * log sigmoid(s_m - s_n) - l2 / 2 * |s|^2``.
    The tiny Gaussian prior keeps the optimum finite and unique when a
    candidate wins or loses everything or the comparison graph is
    disconnected (each component is then centred by the prior), and puts the
    mean at exactly zero. The objective is strictly concave, so damped Newton
    steps converge from zero in a handful of iterations; the result depends
    only on the matrix, and permuting candidates permutes the strengths.
    """
    w = np.asarray(wins, dtype=float)
    if w.ndim != 2 or w.shape[0] != w.shape[1]:
        raise TPODataError(f"Win matrix has shape {w.shape}.", "Pass a square k x k matrix of win counts.")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or np.any(np.diag(w) != 0):
        raise TPODataError(
            "Win matrix has negative, non-finite or self-comparison (diagonal) counts.",
            "Build it with win_matrix(): counts are >= 0 and the diagonal is zero.",
        )
    if not (l2 > 0 and math.isfinite(l2)):
        raise TPODataError(f"bradley_terry got l2={l2}.", "Use a small positive prior such as the default 1e-3.")
    k = w.shape[0]
    if k == 0:
        return np.zeros(0)
    games = w + w.T

    def objective(s: np.ndarray) -> float:
        diff = s[:, None] - s[None, :]
        # log sigmoid(x) = -logaddexp(0, -x), stable for large |x|.
        return float(-np.sum(w * np.logaddexp(0.0, -diff)) - 0.5 * l2 * s @ s)

    s = np.zeros(k)
    value = objective(s)
    for _ in range(max_iter):
        p = 1.0 / (1.0 + np.exp(-(s[:, None] - s[None, :])))
        grad = np.sum(w - games * p, axis=1) - l2 * s
        curv = games * p * p.T  # p.T = 1 - p
        hess = curv - np.diag(curv.sum(axis=1) + l2)
        step = np.linalg.solve(hess, -grad)
        # Backtracking: a pure Newton step can overshoot on logistic losses. Near the optimum a
        # step's gain is below the objective's float noise; refusing it would stop short (~1e-6).
        t = 1.0
        while True:
            trial = s + t * step
            trial_value = objective(trial)
            if trial_value >= value - 1e-12 * max(1.0, abs(value)) or t < 1e-8:
                break
            t *= 0.5
        s, value = trial, trial_value
        if np.max(np.abs(t * step)) < tol:
            break
    return s - s.mean()


def first_position_p_value(first_wins: int, decided: int) -> float:
    """Two-sided exact binomial p-value of ``first_wins`` out of ``decided`` when either position wins half."""
    if not 0 <= first_wins <= decided:
        raise TPODataError(
            f"first_wins={first_wins} is not between 0 and decided={decided}.",
            "Count first-position wins among the decided (non-tie) calls only.",
        )
    tail = min(first_wins, decided - first_wins)
    # Log space: 0.5 ** decided underflows beyond ~1000 calls.
    logs = [math.lgamma(decided + 1) - math.lgamma(i + 1) - math.lgamma(decided - i + 1) - decided * math.log(2)
            for i in range(tail + 1)]
    top = max(logs)
    return min(1.0, 2.0 * math.exp(top) * math.fsum(math.exp(x - top) for x in logs))


def position_biased(first_wins: int, decided: int) -> bool:
    """Whether a judge whose first-shown response won ``first_wins`` of ``decided`` calls is position-biased."""
    if decided == 0:
        return False
    share = first_wins / decided
    return (max(share, 1.0 - share) >= POSITION_BIAS_MIN_SHARE
            and first_position_p_value(first_wins, decided) < POSITION_BIAS_P)


def check_finite(scores: Sequence[float] | np.ndarray) -> np.ndarray:
    """Boolean mask of finite scores (None, NaN and +-inf are False).

    A judge that returns NaN or inf is broken for that instruction; callers
    drop the instruction and count it (pairs.DROP_NON_FINITE) instead of
    letting one bad number shift everyone's z-scores.
    """
    return np.isfinite(np.asarray(scores, dtype=float))


def no_spread(x: Sequence[float] | np.ndarray) -> bool:
    """Whether the values cannot tell samples apart (equal up to float noise, relative to their size)."""
    x = np.asarray(x, dtype=float)
    return bool(x.std() <= _ZERO_STD_RTOL * max(1.0, abs(x.mean())))


def _zscore(x: np.ndarray) -> np.ndarray:
    """(x - mean) / std with the population std; a constant vector maps to zeros.

    Zero spread means the quantity cannot tell the samples apart, so it must
    not move the score: z = 0 rather than a division by zero.
    """
    if no_spread(x):
        return np.zeros_like(x)
    return (x - x.mean()) / x.std()


def validate_rho(rho: float) -> float:
    """Return rho as a float, or raise TPODataError unless 0 <= rho <= 0.5 (the paper's range)."""
    if not (isinstance(rho, (int, float, np.floating)) and 0.0 <= float(rho) <= RHO_MAX):
        raise TPODataError(
            f"Length-control coefficient rho={rho!r} is outside [0, {RHO_MAX}].",
            f"Set rho between 0 (no length control) and {RHO_MAX}, or use auto_rho().",
        )
    return float(rho)


def length_controlled(
    scores: Sequence[float] | np.ndarray, lengths: Sequence[float] | np.ndarray, rho: float
) -> np.ndarray:
    """Length-controlled scores ``s = z(score) - rho * z(length)`` over the samples of ONE instruction.

    z is (x - mean) / std with the population std, computed over exactly the
    samples passed (pass only the valid ones: parsed, with finite scores).
    A quantity with zero spread contributes z = 0.
    """
    rho = validate_rho(rho)
    sc = np.asarray(scores, dtype=float)
    ln = np.asarray(lengths, dtype=float)
    if sc.ndim != 1 or sc.shape != ln.shape:
        raise TPODataError(
            f"Scores {sc.shape} and lengths {ln.shape} differ in shape.",
            "Pass one score and one length per sample of the same instruction.",
        )
    if sc.size == 0:
        return sc
    if not check_finite(sc).all():
        raise TPODataError(
            "A score passed to length control is NaN or infinite.",
            "Mask scores with check_finite() first and drop the instruction (pairs.select_pair does this).",
        )
    if not np.all(np.isfinite(ln)) or np.any(ln < 0):
        raise TPODataError("A response length is negative or not finite.", "Pass lengths as character counts (>= 0).")
    return _zscore(sc) - rho * _zscore(ln)


@dataclass(frozen=True)
class AutoRho:
    """Outcome of :func:`auto_rho`.

    ``satisfied`` is False when no grid value makes chosen responses on
    average no longer than rejected ones; ``rho`` is then the largest grid value
    it could check (the grid maximum when none kept a pair). It is None when
    pairs were kept but at no grid value has one a rejected sample picked by s
    (every one rejects a parse failure or a truncated sample): there is nothing
    to check, and ``rho`` is the grid minimum. Means are over the ``n_pairs`` judged pairs kept at ``rho``
    (NaN when there are none).
    """

    rho: float
    satisfied: bool | None
    mean_chosen_length: float
    mean_rejected_length: float
    n_pairs: int


def auto_rho(groups: Sequence[Group], grid: Sequence[float] | np.ndarray = DEFAULT_RHO_GRID, *,
             reject_parse_failures: bool = True, length_breaks_ties: bool = False) -> AutoRho:
    """Smallest rho in ``grid`` whose pairs have mean chosen length <= mean rejected length.

    ``groups`` holds one ``(scores, lengths, parsed[, truncated])`` per
    instruction. Pairs are selected exactly as :func:`tpo_data.pairs.select_pairs`
    does with the same options, so the condition is checked on the pairs that
    are written: on those whose rejected sample s picked. A parse failure or a
    truncated sample is rejected whatever rho is, and its length (a long raw
    output, or one cut at the token limit) would satisfy the condition at rho 0
    however long the chosen responses are; when every kept pair rejects one,
    the condition is not checked (``satisfied`` None, see :class:`AutoRho`). A rho that keeps no pair cannot be checked and
    does not satisfy the condition.
    """
    # pairs builds on this module, so import it here to avoid an import cycle.
    from tpo_data.pairs import select_pairs

    values = sorted({validate_rho(float(r)) for r in grid})
    if not values:
        raise TPODataError("auto_rho got an empty rho grid.", "Pass at least one rho in [0, 0.5].")
    result, kept = None, False
    for rho in values:
        selection = select_pairs(groups, rho, reject_parse_failures=reject_parse_failures,
                                 length_breaks_ties=length_breaks_ties)
        kept = kept or bool(selection.pairs)
        judged = [p for _, p in selection.pairs if p.rejected_parsed and not p.rejected_truncated]
        if not judged:  # nothing to check at this rho (length_breaks_ties adds pairs from rho > 0)
            continue
        mean_c = float(np.mean([p.chosen_length for p in judged]))
        mean_r = float(np.mean([p.rejected_length for p in judged]))
        result = AutoRho(rho, mean_c <= mean_r, mean_c, mean_r, len(judged))
        if result.satisfied:
            return result
    if result is not None:
        return result  # the largest rho it could check, unsatisfied
    if kept:
        return AutoRho(values[0], None, math.nan, math.nan, 0)
    return AutoRho(values[-1], False, math.nan, math.nan, 0)

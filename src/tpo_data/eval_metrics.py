"""Pure arithmetic of the held-out evaluation (``tpo-data eval``): no models, no files.

A comparison of model X against model Y on one instruction is judged in both
orders (X shown as A, then Y shown as A). Each order gives X 1 point for a
win, 0 for a loss and 1/2 for a tie or an unparsable verdict; the
instruction's outcome is the mean of the two orders, so a judge that always
names position A scores exactly 1/2. The win rate of X over Y is the mean
outcome over instructions, which counts ties as half, as AlpacaEval does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


def order_points(r: int, x_shown_as_a: bool) -> float:
    """Points of model X from one verdict r (+1: A won, -1: B won, 0: tie or unparsable)."""
    if r not in (-1, 0, 1):
        raise ValueError(f"verdict must be -1, 0 or +1, got {r!r}")
    if r == 0:
        return 0.5
    return 1.0 if (r == 1) == x_shown_as_a else 0.0


def outcome(r_x_first: int, r_y_first: int) -> float:
    """X's outcome on one instruction from the verdicts with X shown first and with Y shown first."""
    return (order_points(r_x_first, True) + order_points(r_y_first, False)) / 2


@dataclass(frozen=True)
class WinRate:
    """Mean outcome with a normal-approximation 95% interval over ``n`` instructions."""

    rate: float
    n: int
    ci95: float | None  # None: one instruction gives no spread to estimate
    wins: int  # instructions X won in both orders
    losses: int  # ... lost in both orders

    def as_dict(self) -> dict:
        return {"win_rate": self.rate, "n": self.n, "ci95": self.ci95,
                "wins": self.wins, "losses": self.losses,
                # Neither won nor lost in both orders: tied, or won one order and tied or lost the other.
                "split_or_tied": self.n - self.wins - self.losses}


def win_rate(outcomes: Sequence[float]) -> WinRate:
    """Aggregate per-instruction outcomes (each in {0, 1/4, 1/2, 3/4, 1})."""
    n = len(outcomes)
    if n == 0:
        return WinRate(math.nan, 0, None, 0, 0)
    mean = sum(outcomes) / n
    # One instruction gives no spread to estimate: the interval is unknown, not zero.
    ci = 1.96 * math.sqrt(sum((o - mean) ** 2 for o in outcomes) / (n - 1) / n) if n > 1 else None
    return WinRate(mean, n, ci, sum(o == 1.0 for o in outcomes), sum(o == 0.0 for o in outcomes))


def by_category(outcomes: Sequence[float], categories: Sequence[str]) -> dict[str, WinRate]:
    """Win rate per category, categories sorted by name."""
    groups: dict[str, list[float]] = {}
    for o, c in zip(outcomes, categories, strict=True):
        groups.setdefault(c, []).append(o)
    return {c: win_rate(groups[c]) for c in sorted(groups)}


def shown_response(generation: str, response: str | None, parsed: bool) -> str:
    """What a user of the model sees: the response, or the whole output when it did not split.

    A parse failure is not hidden from the judge: a model that breaks the
    format shows its raw output, thoughts and all, and is judged on it.
    """
    return response if parsed and response is not None else generation


def output_stats(rows: Iterable[dict]) -> dict:
    """Parse rate and mean thought / response lengths (characters) of one sample per row.

    Rows are ledger rows (``generation``, ``thoughts``, ``responses``, ``parsed``
    lists); the first sample of each row is used. Lengths are over parsed samples;
    the shown length covers every sample as :func:`shown_response` shows it.
    """
    parsed, thought_len, response_len, shown_len = 0, [], [], []
    n = 0
    for row in rows:
        n += 1
        ok = bool(row["parsed"][0])
        parsed += ok
        shown_len.append(len(shown_response(row["generation"][0], row["responses"][0], ok)))
        if ok:
            thought_len.append(len(row["thoughts"][0] or ""))
            response_len.append(len(row["responses"][0] or ""))

    def mean(xs: list[int]) -> float | None:
        return sum(xs) / len(xs) if xs else None

    return {"samples": n, "parsed": parsed, "parse_rate": parsed / n if n else math.nan,
            "mean_thought_chars": mean(thought_len), "mean_response_chars": mean(response_len),
            "mean_shown_chars": mean(shown_len)}

"""Tournament mode: find the best and worst of K samples with far fewer judge calls.

Beyond the paper. TPO keeps only argmax and argmin of each instruction's
samples, so the full round robin of K(K-1) ordered comparisons (56 at K=8)
mostly measures candidates in the middle that are never used. This schedule
needs at most :func:`tournament_calls` calls (14 at K=8, a quarter):

1. Round 1 pairs the candidates (0, 1), (2, 3), ... with one call each. With
   odd K the last candidate has a bye and enters both brackets.
2. The round-1 winners play a knock-out "max" bracket for the best and, in
   the same judge rounds, the round-1 losers play a knock-out "min" bracket
   for the worst (there the worse candidate advances). Entrants are paired
   first come, first served.
3. Each bracket's final, the closest match, is judged in both orders, which
   cancels the judge's position bias. Every other match is one call that
   shows as A whichever candidate has been A less often (alternating when
   even).
4. A single call that comes back as a tie or unparsable is judged again in
   the other order while the repair budget (``repairs``, default 2) lasts.

In simulation (``bench/judging.py``) this agreed with the round robin more
often than judging round 1 in both orders with single-call brackets, which
also takes 14 calls: 51% vs 46% of instructions at the default judge noise,
92% vs 85% at judge accuracy 0.93. There a tie in a single call decides its
match by index, which a repair mostly avoids.

The judge step (``judges.PairwiseJudge``) does not take the bracket's
``best``/``worst``: it fits Bradley-Terry strengths on the tournament's
judgments, since length control needs a score per sample, and pairs pick
argmax/argmin of the length-controlled scores. At rho 0 that agrees with the
round robin about as often as the bracket does (51.6% vs 51.0% in the bench).

A match that stays drawn goes to the candidate with more wins over all
judgments so far, then to the lower index. If a bye candidate wins the max
bracket and also the min bracket (only an inconsistent judge does that), it
stays the best and its last opponent in the min bracket becomes the worst.

With a judge that always prefers the truly better answer, the best wins every
match and the worst loses every match, so both are always found.

A judge with a strong position bias (one that names "A" whatever it is
shown) decides the single-call matches by position instead: use the round
robin with such a judge. The judging statistics measure the bias
(``judge_first_wins``) and flag it.

Batching: :meth:`Tournament.next_calls` lists every call one instruction can
make now; callers gather them over many instructions, send one batch to the
judge, and :meth:`Tournament.record` the results. A round is resolved once
all its calls are recorded, in a fixed order, so results do not depend on
the order of recording. At K=8 that is 3 judge rounds, plus one per stage
that needed a repair.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from tpo_data.errors import TPODataError

DEFAULT_REPAIRS = 2


def round_robin_calls(k: int) -> list[tuple[int, int]]:
    """Every ordered pair (shown as A, shown as B) of k candidates: k(k-1) calls, the paper's schedule."""
    return [(m, n) for m in range(k) for n in range(k) if m != n]


def tournament_calls(k: int, repairs: int = DEFAULT_REPAIRS) -> int:
    """The most judge calls a :class:`Tournament` over k >= 2 candidates makes (14 at k=8)."""
    if k == 2:
        return 2  # the only match is both finals: both orders, nothing to repair
    round1 = k // 2
    bracket_matches = 2 * ((k + 1) // 2 - 1)
    return round1 + bracket_matches + 2 + repairs  # + 2: the second call of each final


@dataclass
class _Match:
    a: int
    b: int
    bracket: str  # "r1", "max" or "min"
    double: bool
    calls: list[tuple[int, int]] = field(default_factory=list)
    repaired: bool = False


@dataclass
class _Bracket:
    alive: int  # candidates that can still win this bracket
    waiting: list[int] = field(default_factory=list)
    last_opponent: dict[int, int] = field(default_factory=dict)


class Tournament:
    """Adaptive best/worst search over ``k`` candidates (schedule in the module docstring).

    ``best`` and ``worst`` are None until ``finished``. ``judgments`` holds
    every recorded (shown as A, shown as B, r) with r = +1 (A won), -1 (B won)
    or 0 (tie / unparsable), ready for scoring.win_matrix and bradley_terry.
    """

    def __init__(self, k: int, repairs: int = DEFAULT_REPAIRS):
        if k < 2:
            raise TPODataError(
                f"A tournament needs at least 2 candidates, got {k}.",
                "Skip instructions with fewer than 2 parsed samples (pairs.select_pair drops them).",
            )
        if repairs < 0:
            raise TPODataError(f"Tournament got repairs={repairs}.", "Use 0 or more repair calls (default 2).")
        self.k = k
        self.judgments: list[tuple[int, int, int]] = []
        self.best: int | None = None
        self.worst: int | None = None
        self._repairs_left = repairs
        self._wins = [0] * k
        self._shown_as_a = [0] * k
        self._flip = False
        self._results: dict[tuple[int, int], int] = {}
        self._open: list[_Match] = []  # matches in creation order
        half = (k + 1) // 2
        self._brackets = {"max": _Bracket(half), "min": _Bracket(half)}
        if k % 2:
            for bracket in self._brackets.values():
                bracket.waiting.append(k - 1)
        self._open = [self._new_match(a, a + 1, "r1", double=k == 2) for a in range(0, k - 1, 2)]

    @property
    def finished(self) -> bool:
        return self.best is not None

    @property
    def calls_used(self) -> int:
        return len(self.judgments)

    def next_calls(self) -> list[tuple[int, int]]:
        """Calls to make now (the current round's unanswered calls); empty once finished."""
        return [call for m in self._open for call in m.calls if call not in self._results]

    def record(self, results: Iterable[tuple[int, int, int]]) -> None:
        """Record ``(shown as A, shown as B, r)`` results for calls from :meth:`next_calls`.

        Results may come in any order and in several parts; the round is
        resolved once every call in it has a result.
        """
        results = list(results)
        open_calls = set(self.next_calls())
        for a, b, r in results:
            if (a, b) not in open_calls:
                raise TPODataError(
                    f"Result for ({a}, {b}) does not answer an open call of this tournament.",
                    "Record each call returned by next_calls() exactly once.",
                )
            if r not in (-1, 0, 1):
                raise TPODataError(
                    f"Result ({a}, {b}, {r!r}) is not +1, -1 or 0.",
                    "Use +1 when A wins, -1 when B wins and 0 for a tie or an unparsable verdict.",
                )
            open_calls.discard((a, b))
        for a, b, r in results:
            self._results[(a, b)] = r
            self.judgments.append((a, b, r))
            if r:
                self._wins[a if r == 1 else b] += 1
        if self._open and not open_calls:
            self._resolve_round()

    def _new_match(self, a: int, b: int, bracket: str, double: bool) -> _Match:
        match = _Match(a, b, bracket, double)
        if double:
            match.calls = [(a, b), (b, a)]
        elif self._shown_as_a[a] != self._shown_as_a[b]:
            match.calls = [(a, b) if self._shown_as_a[a] < self._shown_as_a[b] else (b, a)]
        else:
            match.calls = [(b, a) if self._flip else (a, b)]
            self._flip = not self._flip
        for first, _ in match.calls:
            self._shown_as_a[first] += 1
        return match

    def _margin(self, match: _Match) -> int:
        """Verdicts in favour of ``match.a`` minus those for ``match.b``."""
        return sum(self._results[(a, b)] * (1 if a == match.a else -1) for a, b in match.calls)

    def _resolve_round(self) -> None:
        still_open: list[_Match] = []
        for match in self._open:
            margin = self._margin(match)
            if margin == 0 and not match.double and not match.repaired and self._repairs_left:
                # One more call in the other order; it joins the next round.
                self._repairs_left -= 1
                match.repaired = True
                first_a, first_b = match.calls[0]
                repair = (first_b, first_a)
                match.calls.append(repair)
                self._shown_as_a[repair[0]] += 1
                still_open.append(match)
                continue
            if margin == 0:
                wa, wb = self._wins[match.a], self._wins[match.b]
                margin = wa - wb if wa != wb else match.b - match.a
            winner, loser = (match.a, match.b) if margin > 0 else (match.b, match.a)
            if match.bracket in ("r1", "max"):
                self._advance("max", winner, loser, match.bracket == "max")
            if match.bracket in ("r1", "min"):
                self._advance("min", loser, winner, match.bracket == "min")
        new = self._pair("max") + self._pair("min")
        self._open = still_open + new
        if not self._open:
            self._conclude()

    def _advance(self, name: str, advancing: int, eliminated: int, bracket_match: bool) -> None:
        bracket = self._brackets[name]
        bracket.waiting.append(advancing)
        if bracket_match:
            bracket.alive -= 1
            bracket.last_opponent[advancing] = eliminated

    def _pair(self, name: str) -> list[_Match]:
        bracket = self._brackets[name]
        matches = []
        while len(bracket.waiting) >= 2:
            a, b = bracket.waiting.pop(0), bracket.waiting.pop(0)
            # The final is the match between the last two candidates alive.
            matches.append(self._new_match(a, b, name, double=bracket.alive == 2))
        return matches

    def _conclude(self) -> None:
        (best,), (worst,) = self._brackets["max"].waiting, self._brackets["min"].waiting
        if best == worst:
            worst = self._brackets["min"].last_opponent[worst]
        self.best, self.worst = best, worst

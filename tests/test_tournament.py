"""Tournament mode scheduling (tpo_data.tournament)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tpo_data.errors import TPODataError
from tpo_data.scoring import bradley_terry, win_matrix
from tpo_data.tournament import DEFAULT_REPAIRS, Tournament, round_robin_calls, tournament_calls


def run(tour: Tournament, judge) -> list[list[tuple[int, int]]]:
    """Play to the end with ``judge(a, b) -> r``; returns the calls of every round."""
    rounds = []
    while not tour.finished:
        calls = tour.next_calls()
        assert calls, "an unfinished tournament must have calls to make"
        rounds.append(calls)
        tour.record([(a, b, judge(a, b)) for a, b in calls])
    assert tour.next_calls() == []
    return rounds


def noiseless(strengths):
    return lambda a, b: 1 if strengths[a] > strengths[b] else -1


def test_call_budgets():
    assert tournament_calls(8) == 14
    assert tournament_calls(8, repairs=0) == 12
    assert tournament_calls(2) == 2
    assert [tournament_calls(k) for k in (3, 4, 5, 12)] == [7, 8, 10, 20]
    calls = round_robin_calls(8)
    assert len(calls) == 56 == len(set(calls))
    assert all(a != b for a, b in calls)


def test_first_round_alternates_presentation_order():
    assert Tournament(8).next_calls() == [(0, 1), (3, 2), (4, 5), (7, 6)]
    assert Tournament(2).next_calls() == [(0, 1), (1, 0)]  # the only match is both finals


def test_noiseless_k8_three_rounds_and_double_finals():
    strengths = [0.3, 2.0, -1.0, 0.1, 1.5, -0.2, -3.0, 0.9]
    tour = Tournament(8)
    rounds = run(tour, noiseless(strengths))
    assert (tour.best, tour.worst) == (1, 6)
    assert tour.calls_used == 12 and len(rounds) == 3
    # Finals: the two best (1, 4) and the two worst (6, 2), both orders each.
    assert sorted(rounds[-1]) == sorted([(1, 4), (4, 1), (2, 6), (6, 2)])


@given(st.integers(2, 12).flatmap(lambda k: st.lists(st.floats(-10, 10), min_size=k, max_size=k, unique=True)))
@settings(max_examples=300, deadline=None)
def test_noiseless_judge_always_finds_true_best_and_worst(strengths):
    k = len(strengths)
    tour = Tournament(k)
    run(tour, noiseless(strengths))
    assert tour.best == int(np.argmax(strengths))
    assert tour.worst == int(np.argmin(strengths))
    assert tour.calls_used <= tournament_calls(k)


@given(st.integers(2, 12), st.data())
@settings(max_examples=300, deadline=None)
def test_any_judge_gives_well_formed_calls_within_budget(k, data):
    tour = Tournament(k)
    seen = set()

    def judge(a, b):
        return data.draw(st.sampled_from([-1, 0, 1]))

    for calls in run(tour, judge):
        for a, b in calls:
            assert 0 <= a < k and 0 <= b < k and a != b
            assert (a, b) not in seen, "an ordered pair was asked twice"
            seen.add((a, b))
    assert tour.calls_used == len(tour.judgments) == len(seen) <= tournament_calls(k)
    if k == 8:
        assert tour.calls_used <= 14
    assert tour.best != tour.worst
    assert 0 <= tour.best < k and 0 <= tour.worst < k
    # The sparse judgments feed Bradley-Terry directly.
    assert np.all(np.isfinite(bradley_terry(win_matrix(k, tour.judgments))))


@given(st.lists(st.sampled_from([-1, 0, 1]), min_size=14, max_size=14))
@settings(max_examples=300, deadline=None)
def test_k8_never_exceeds_14_calls(verdicts):
    tour = Tournament(8)
    answers = iter(verdicts)
    run(tour, lambda a, b: next(answers))  # StopIteration here would mean a 15th call
    assert tour.calls_used <= 14
    assert len(set(tour.judgments)) == tour.calls_used


def test_all_ties_resolve_deterministically():
    tour = Tournament(8)
    run(tour, lambda a, b: 0)
    # Two repairs, then every draw goes to the lower index (nobody has wins).
    assert (tour.best, tour.worst) == (0, 7)
    assert tour.calls_used == 14


def test_draw_goes_to_the_candidate_with_more_wins_before_lower_index():
    tour = Tournament(4, repairs=0)
    assert tour.next_calls() == [(0, 1), (3, 2)]
    tour.record([(0, 1, 0), (3, 2, 1)])  # 0 advances on index, 3 on a win
    assert sorted(tour.next_calls()) == sorted([(0, 3), (3, 0), (1, 2), (2, 1)])
    tour.record([(0, 3, 0), (3, 0, 0), (1, 2, 0), (2, 1, 0)])
    assert tour.best == 3  # one win beats the lower index
    assert tour.worst == 2  # 1 and 2 have no wins: lower index 1 counts as better


def test_split_final_is_a_draw():
    tour = Tournament(2)
    tour.record([(0, 1, 1), (1, 0, 1)])  # each wins when shown as A
    assert (tour.best, tour.worst) == (0, 1)


def test_repair_rejudges_a_tie_in_the_other_order():
    tour = Tournament(4, repairs=1)
    tour.record([(0, 1, 0), (3, 2, 0)])
    # Only the first tied match gets the single repair; 2 beats 3 on index.
    assert tour.next_calls() == [(1, 0)]
    tour.record([(1, 0, 1)])  # 1 wins the repair
    assert sorted(tour.next_calls()) == sorted([(2, 1), (1, 2), (3, 0), (0, 3)])


def test_bye_candidate_cannot_be_both_best_and_worst():
    # K=3: candidate 2 has a bye and plays in both brackets. An inconsistent
    # judge makes it win the max final and lose the min final.
    tour = Tournament(3, repairs=0)
    tour.record([(0, 1, 1)])  # 0 beats 1
    assert sorted(tour.next_calls()) == sorted([(2, 0), (0, 2), (2, 1), (1, 2)])
    tour.record([(2, 0, 1), (0, 2, -1), (2, 1, -1), (1, 2, 1)])
    assert tour.best == 2
    assert tour.worst == 1  # its min-bracket opponent


def test_record_order_and_partial_recording_do_not_matter():
    rng = np.random.default_rng(7)
    verdicts = {(a, b): int(rng.choice([-1, 0, 1])) for a, b in round_robin_calls(8)}

    def play(reorder):
        tour = Tournament(8)
        while not tour.finished:
            results = [(a, b, verdicts[(a, b)]) for a, b in tour.next_calls()]
            results = reorder(results)
            tour.record(results[:1])
            if not tour.finished and results[1:]:
                tour.record(results[1:])
        return tour.best, tour.worst, sorted(tour.judgments)

    assert play(lambda r: r) == play(lambda r: r[::-1])


def test_next_calls_is_idempotent_until_recorded():
    tour = Tournament(6)
    assert tour.next_calls() == tour.next_calls()
    tour.record([tour.next_calls()[0] + (1,)])
    assert len(tour.next_calls()) == 2


@pytest.mark.parametrize(
    "results",
    [
        [(1, 0, 1)],  # not an open call (wrong order)
        [(0, 1, 1), (0, 1, 1)],  # twice
        [(0, 1, 2)],  # bad result
        [(0, 5, 1)],  # unknown candidate
    ],
)
def test_record_rejects_bad_results(results):
    tour = Tournament(4)
    with pytest.raises(TPODataError):
        tour.record(results)
    assert tour.judgments == []  # nothing half-recorded


def test_constructor_validation():
    with pytest.raises(TPODataError):
        Tournament(1)
    with pytest.raises(TPODataError):
        Tournament(8, repairs=-1)
    assert DEFAULT_REPAIRS == 2


def test_noisy_judge_agrees_with_round_robin_more_often_than_chance():
    # Guard against a scheduler that "works" only for a perfect judge: with a
    # judge that is right ~80% of the time it must still usually find the
    # round robin's best and worst (bench/judging.py measures this precisely).
    rng = np.random.default_rng(0)
    agree = 0
    n = 200
    for _ in range(n):
        s = rng.normal(0, 2.0, 8)
        verdicts = {
            (a, b): (1 if rng.random() < 1 / (1 + np.exp(-(s[a] - s[b]))) else -1) for a, b in round_robin_calls(8)
        }
        rr = bradley_terry(win_matrix(8, [(a, b, r) for (a, b), r in verdicts.items()]))
        tour = Tournament(8)
        run(tour, lambda a, b: verdicts[(a, b)])
        agree += (tour.best, tour.worst) == (int(np.argmax(rr)), int(np.argmin(rr)))
    # Measured 0.44 for this seed; random picks would agree 1/56 of the time.
    assert agree / n > 0.3

"""Pair selection and drop accounting (tpo_data.pairs)."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tpo_data.errors import TPODataError
from tpo_data.pairs import (
    DROP_ALL_EQUAL,
    DROP_ALL_TRUNCATED,
    DROP_NO_VALID,
    DROP_NO_VERDICT,
    DROP_NON_FINITE,
    DROP_REASONS,
    DROP_SINGLE_SAMPLE,
    DROP_SINGLE_VALID,
    Drop,
    PairChoice,
    select_pair,
    select_pairs,
    summarize,
)
from tpo_data.scoring import bradley_terry, length_controlled, win_matrix

NAN = float("nan")


def test_argmax_and_argmin_without_length_control():
    pair = select_pair([0.1, 0.9, 0.5], [10, 20, 30], [True, True, True], rho=0.0)
    assert isinstance(pair, PairChoice)
    assert (pair.chosen, pair.rejected, pair.rejected_parsed) == (1, 0, True)
    assert (pair.chosen_score, pair.rejected_score) == (0.9, 0.1)
    assert (pair.chosen_length, pair.rejected_length) == (20, 10)
    # z = (x - 0.5) / sqrt(0.32/3): gap = 0.8 / 0.326599
    assert pair.score_gap == pytest.approx(2.449490, abs=1e-6)
    assert pair.norm_scores == pytest.approx((-1.224745, 1.224745, 0.0), abs=1e-6)


def test_length_control_prefers_the_shorter_near_tie():
    scores, lengths = [1.0, 0.98, 0.0], [900, 300, 500]
    assert select_pair(scores, lengths, [True] * 3, rho=0.0).chosen == 0
    assert select_pair(scores, lengths, [True] * 3, rho=0.3).chosen == 1


def test_parse_failure_is_rejected_and_never_chosen():
    # Sample 0 has the best raw score but did not parse.
    pair = select_pair([9.0, 0.2, 0.8, NAN], [100, 200, 300, 400], [False, True, True, False], rho=0.0)
    assert isinstance(pair, PairChoice)
    assert pair.chosen == 2
    assert pair.rejected == 0  # the first parse failure
    assert pair.rejected_parsed is False
    assert pair.rejected_score is None and pair.score_gap is None
    assert pair.rejected_length == 100
    assert pair.norm_scores == pytest.approx((None, -1.0, 1.0, None))


def test_truncated_sample_is_never_chosen_but_may_be_rejected():
    # Samples 0 and 4 have the best scores but stopped at the token limit; sample 3 did not parse.
    scores, lengths = [9.0, 0.2, 0.8, NAN, 7.0], [100, 200, 300, 400, 50]
    parsed, cut = [True, True, True, False, True], [True, False, False, False, True]
    pair = select_pair(scores, lengths, parsed, 0.0, truncated=cut)
    assert (pair.chosen, pair.rejected) == (2, 3)  # a parse failure is rejected first
    assert not pair.rejected_parsed and not pair.rejected_truncated
    # Without one, the truncated sample the judge liked least.
    parsed[3] = True
    pair = select_pair([9.0, 0.2, 0.8, 0.1, 7.0], lengths, parsed, 0.0, truncated=cut)
    assert (pair.chosen, pair.rejected) == (2, 4)
    assert pair.rejected_parsed and pair.rejected_truncated
    # It keeps its judge score, but the gap is not defined against an excluded sample.
    assert pair.rejected_score == 7.0 and pair.score_gap is None
    valid = np.array([0.2, 0.8, 0.1])
    z = (valid - valid.mean()) / valid.std()
    assert pair.norm_scores == pytest.approx((None, *z, None))
    assert select_pair([NAN, 0.2, 0.8, 0.1, 7.0], lengths, parsed, 0.0, truncated=cut).rejected == 0
    # Without the mask (reject_truncated false) it is the best answer.
    assert select_pair([9.0, 0.2, 0.8, 0.1, 7.0], lengths, parsed, 0.0).chosen == 0
    scores, parsed = [9.0, 0.2, 0.8, NAN, 7.0], [True, True, True, False, True]
    # Invalid samples ignored: the truncated one is neither chosen nor rejected.
    pair = select_pair(scores, lengths, parsed, 0.0, truncated=cut, reject_parse_failures=False)
    assert (pair.chosen, pair.rejected, pair.rejected_truncated) == (2, 1, False)
    assert select_pair([1.0, 2.0], [1, 2], [True, False], 0.0, truncated=[True, False]) == Drop(DROP_ALL_TRUNCATED)
    assert select_pair([1.0, 2.0], [1, 2], [False, False], 0.0, truncated=[True, True]) == Drop(DROP_NO_VALID)
    with pytest.raises(TPODataError, match="truncated"):
        select_pair([1.0, 2.0], [1, 2], [True, True], 0.0, truncated=[True])


def test_parse_failures_can_be_excluded():
    parsed = [False, True, True, True]
    pair = select_pair([9.0, 0.2, 0.8, 0.5], [100, 200, 300, 400], parsed, 0.0, reject_parse_failures=False)
    assert (pair.chosen, pair.rejected, pair.rejected_parsed) == (2, 1, True)
    drop = select_pair([1.0, 2.0], [1, 2], [True, False], 0.0, reject_parse_failures=False)
    assert drop == Drop(DROP_SINGLE_VALID)


def test_one_valid_sample_pairs_with_a_parse_failure():
    pair = select_pair([NAN, 0.3], [50, 60], [False, True], rho=0.5)
    assert (pair.chosen, pair.rejected) == (1, 0)
    assert pair.norm_scores == (None, 0.0)


def test_normalization_uses_valid_samples_only():
    scores = [5.0, 1.0, 2.0, 4.0, 1000.0]
    lengths = [10, 20, 40, 80, 5]
    parsed = [True, True, False, True, False]
    pair = select_pair(scores, lengths, parsed, rho=0.2)
    expected = length_controlled([5.0, 1.0, 4.0], [10, 20, 80], 0.2)
    got = [v for v in pair.norm_scores if v is not None]
    np.testing.assert_allclose(got, expected)


def test_ties_break_to_lowest_index():
    pair = select_pair([1.0, 3.0, 3.0, 0.0, 0.0], [5] * 5, [True] * 5, rho=0.0)
    assert (pair.chosen, pair.rejected) == (1, 3)
    pair = select_pair([2.0, 2.0, 1.0], [5] * 3, [True, True, False], rho=0.0)
    assert (pair.chosen, pair.rejected) == (0, 2)
    # Equal up to float noise is a tie too.
    pair = select_pair([1.0, 1.0 + 2e-16, 0.0, 0.0 - 1e-16], [5] * 4, [True] * 4, rho=0.0)
    assert (pair.chosen, pair.rejected) == (0, 2)


def test_bradley_terry_ties_break_to_lowest_index():
    # Samples with the same record get strengths that differ by float noise only;
    # the lowest index must still win the tie, in every one of these instructions.
    rng = np.random.default_rng(1)
    for _ in range(200):
        k = int(rng.integers(3, 9))
        levels = rng.integers(0, 3, k)
        if levels.min() == levels.max():
            continue
        judgments = [(m, n, int(np.sign(levels[m] - levels[n])) or int(rng.choice([1, -1, 0])))
                     for m, n in itertools.permutations(range(k), 2)]
        strengths = bradley_terry(win_matrix(k, judgments))
        pair = select_pair(strengths, [5] * k, [True] * k, rho=0.0)
        r = np.round(strengths, 9)
        assert (pair.chosen, pair.rejected) == (int(np.flatnonzero(r == r.max())[0]),
                                                int(np.flatnonzero(r == r.min())[0]))


@pytest.mark.parametrize(
    "scores, lengths, parsed, reason",
    [
        ([0.5], [10], [True], DROP_SINGLE_SAMPLE),
        ([NAN], [10], [False], DROP_SINGLE_SAMPLE),
        ([NAN, NAN, NAN], [1, 2, 3], [False, False, False], DROP_NO_VALID),
        ([0.5, 0.5, 0.5], [1, 1, 1], [True, True, True], DROP_ALL_EQUAL),
        ([0.5, NAN, 0.2], [1, 1, 1], [True, True, True], DROP_NON_FINITE),
        ([0.5, float("inf"), 0.2], [1, 1, 1], [True, True, True], DROP_NON_FINITE),
        ([0.5, -float("inf"), 0.2], [1, 1, 1], [True, True, False], DROP_NON_FINITE),
    ],
)
def test_drop_reasons(scores, lengths, parsed, reason):
    assert select_pair(scores, lengths, parsed, rho=0.1) == Drop(reason)


@pytest.mark.parametrize("rho", [0.0, 0.1, 0.5])
def test_equal_judge_scores_never_pair_by_length_alone(rho):
    # The judge could not tell the samples apart (e.g. every verdict cancelled): no pair,
    # even where length control would separate them. Float noise in a BT fit counts as equal.
    assert select_pair([0.5, 0.5, 0.5], [100, 300, 200], [True] * 3, rho=rho) == Drop(DROP_ALL_EQUAL)
    assert select_pair([1e-13, -2e-13, 0.0], [100, 300, 200], [True] * 3, rho=rho) == Drop(DROP_ALL_EQUAL)
    # Any real difference in judge scores gives a pair.
    assert isinstance(select_pair([0.5, 0.5, 0.6], [100, 300, 200], [True] * 3, rho=rho), PairChoice)


def test_length_breaks_ties_when_asked():
    pair = select_pair([0.5, 0.5, 0.5], [100, 300, 200], [True] * 3, rho=0.1, length_breaks_ties=True)
    assert (pair.chosen, pair.rejected) == (0, 1)  # shortest chosen, longest rejected
    # Without length control nothing separates them.
    assert select_pair([0.5, 0.5, 0.5], [100, 300, 200], [True] * 3, rho=0.0,
                       length_breaks_ties=True) == Drop(DROP_ALL_EQUAL)
    # A rho so small that the spread lies between one and two tie tolerances: sample 0 ties
    # both the best and the worst, and a pair of a sample with itself is no pair.
    assert select_pair([0.5, 0.5, 0.5], [200, 100, 300], [True] * 3, rho=6e-10,
                       length_breaks_ties=True) == Drop(DROP_ALL_EQUAL)


def test_all_equal_but_a_parse_failure_gives_a_pair():
    pair = select_pair([0.5, 0.5, NAN], [1, 1, 1], [True, True, False], rho=0.0)
    assert (pair.chosen, pair.rejected) == (0, 2)


def test_non_finite_score_of_a_parse_failure_is_ignored():
    assert isinstance(select_pair([0.1, float("inf"), 0.4], [1, 2, 3], [True, False, True], 0.0), PairChoice)


@pytest.mark.parametrize(
    "args",
    [
        ([], [], []),
        ([1.0, 2.0], [1], [True, True]),
        ([1.0, 2.0], [1, 2], [True]),
    ],
)
def test_bad_shapes_raise(args):
    with pytest.raises(TPODataError):
        select_pair(*args, rho=0.0)


def test_bad_rho_raises():
    with pytest.raises(TPODataError):
        select_pair([1.0, 2.0], [1, 2], [True, True], rho=0.6)


instruction = st.integers(1, 9).flatmap(
    lambda k: st.tuples(
        st.lists(st.one_of(st.floats(-5, 5), st.just(NAN)), min_size=k, max_size=k),
        st.lists(st.integers(0, 5000), min_size=k, max_size=k),
        st.lists(st.booleans(), min_size=k, max_size=k),
    )
)


@given(instruction, st.sampled_from([0.0, 0.1, 0.25, 0.5]))
@settings(max_examples=200, deadline=None)
def test_pair_rules_hold_for_any_instruction(group, rho):
    scores, lengths, parsed = group
    result = select_pair(scores, lengths, parsed, rho)
    valid = [i for i, ok in enumerate(parsed) if ok]
    if isinstance(result, Drop):
        assert result.reason in DROP_REASONS
        if len(scores) == 1:
            assert result.reason == DROP_SINGLE_SAMPLE
        elif any(math.isnan(scores[i]) for i in valid):
            assert result.reason == DROP_NON_FINITE
        elif not valid:
            assert result.reason == DROP_NO_VALID
        else:
            assert result.reason == DROP_ALL_EQUAL and all(parsed)
        return
    assert parsed[result.chosen], "a parse failure was chosen"
    assert result.chosen != result.rejected
    s = [result.norm_scores[i] for i in valid]
    # argmax, lowest index among ties (equal up to float noise)
    assert result.chosen == valid[next(j for j, v in enumerate(s) if v >= max(s) - 1e-9)]
    if not all(parsed):
        assert result.rejected == parsed.index(False)
        assert not result.rejected_parsed and result.score_gap is None
    else:
        assert result.rejected == valid[next(j for j, v in enumerate(s) if v <= min(s) + 1e-9)]
        assert result.score_gap == pytest.approx(max(s) - min(s)) and result.score_gap > 0
    assert [v is not None for v in result.norm_scores] == list(parsed)


def test_select_pairs_counts_drops_and_summarize():
    groups = [
        ([0.1, 0.9], [10, 30], [True, True]),  # pair 1 > 0
        ([0.3], [5], [True]),  # single_sample
        ([NAN, NAN], [1, 1], [False, False]),  # no_valid_candidate
        ([0.2, 0.2], [7, 7], [True, True]),  # all_equal
        ([0.7, NAN, 0.1], [20, 99, 40], [True, False, True]),  # pair 0 > 1 (parse failure)
        ([0.5, NAN], [3, 3], [True, True]),  # non_finite_score
        ([0.9, 0.4], [8, 9], [True, True], [True, True]),  # all_truncated
        ([0.9, 0.4, 0.2], [8, 9, 6], [True, True, True], [True, False, False]),  # pair 1 > 0 (truncated)
    ]
    selection = select_pairs(groups, rho=0.0)
    assert [i for i, _ in selection.pairs] == [0, 4, 7]
    assert selection.dropped == [(1, DROP_SINGLE_SAMPLE), (2, DROP_NO_VALID), (3, DROP_ALL_EQUAL),
                                 (5, DROP_NON_FINITE), (6, DROP_ALL_TRUNCATED)]
    assert selection.drops == Counter(
        {DROP_SINGLE_SAMPLE: 1, DROP_NO_VALID: 1, DROP_ALL_EQUAL: 1, DROP_NON_FINITE: 1, DROP_ALL_TRUNCATED: 1}
    )
    stats = summarize(selection)
    assert stats["instructions"] == 8
    assert stats["samples"] == 17
    assert stats["parse_rate"] == pytest.approx(14 / 17)  # truncated samples did parse
    assert stats["pairs_kept"] == 3
    assert stats["drops"] == {
        DROP_SINGLE_SAMPLE: 1,
        DROP_NON_FINITE: 1,
        DROP_NO_VERDICT: 0,
        DROP_NO_VALID: 1,
        DROP_ALL_TRUNCATED: 1,
        DROP_ALL_EQUAL: 1,
        DROP_SINGLE_VALID: 0,
    }
    assert stats["rejected_parse_failures"] == 1
    assert [p.rejected_truncated for _, p in selection.pairs] == [False, False, True]
    assert stats["mean_chosen_length"] == pytest.approx((30 + 20 + 9) / 3)
    assert stats["mean_rejected_length"] == pytest.approx((10 + 99 + 8) / 3)
    assert stats["rho"] == 0.0

    relabeled = selection.relabel({5: DROP_NO_VERDICT})
    assert relabeled.dropped[3] == (5, DROP_NO_VERDICT) and relabeled.dropped[:3] == selection.dropped[:3]
    assert summarize(relabeled)["drops"][DROP_NO_VERDICT] == 1
    assert summarize(relabeled)["drops"][DROP_NON_FINITE] == 0
    assert relabeled.pairs == selection.pairs
    with pytest.raises(ValueError, match="not dropped \\[0\\]"):
        selection.relabel({0: DROP_NO_VERDICT})  # a kept pair cannot be relabeled as a drop
    with pytest.raises(ValueError, match="unknown reasons \\['oops'\\]"):
        selection.relabel({5: "oops"})


def test_summarize_empty():
    stats = summarize(select_pairs([], rho=0.2))
    assert stats["pairs_kept"] == 0 and math.isnan(stats["parse_rate"]) and math.isnan(stats["mean_chosen_length"])

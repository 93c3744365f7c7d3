"""Win matrices, Bradley-Terry, length control and auto_rho (tpo_data.scoring)."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tpo_data.errors import TPODataError
from tpo_data.pairs import select_pairs
from tpo_data.scoring import (
    DEFAULT_RHO_GRID,
    auto_rho,
    bradley_terry,
    check_finite,
    first_position_p_value,
    length_controlled,
    position_biased,
    win_matrix,
)

FAST = settings(max_examples=60, deadline=None)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


# --- win_matrix ---------------------------------------------------------------


def test_win_matrix_counts_both_orders():
    # m=0 beats 1 when shown as A (r=+1) and again when shown as B (r=-1 in (1, 0)).
    wins = win_matrix(3, [(0, 1, 1), (1, 0, -1), (2, 0, 1), (0, 2, 0), (1, 2, -1)])
    expected = np.array([[0, 2, 0], [0, 0, 0], [1, 1, 0]], dtype=float)
    np.testing.assert_array_equal(wins, expected)


def test_win_matrix_ties_add_nothing_and_repeats_accumulate():
    assert win_matrix(2, [(0, 1, 0), (1, 0, 0)]).sum() == 0
    wins = win_matrix(2, [(0, 1, 1)] * 3 + [(1, 0, 1)])
    np.testing.assert_array_equal(wins, [[0, 3], [1, 0]])


@pytest.mark.parametrize("judgment", [(0, 0, 1), (0, 3, 1), (-1, 0, 1), (0, 1, 2)])
def test_win_matrix_rejects_bad_judgments(judgment):
    with pytest.raises(TPODataError):
        win_matrix(3, [judgment])


@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4), st.sampled_from([-1, 0, 1])), max_size=60))
@FAST
def test_win_matrix_matches_the_paper_formula(raw):
    judgments = [(m, n, r) for m, n, r in raw if m != n]
    wins = win_matrix(5, judgments)
    for m in range(5):
        for n in range(5):
            # B_mn = [r^mn = +1] + [r^nm = -1], summed over repeated judgments.
            expected = sum(1 for a, b, r in judgments if (a, b, r) == (m, n, 1) or (a, b, r) == (n, m, -1))
            assert wins[m, n] == expected
    assert wins.sum() == sum(1 for *_, r in judgments if r != 0)


# --- bradley_terry --------------------------------------------------------------


def test_bt_two_candidates_closed_form():
    # With a negligible prior the MLE is s0 - s1 = log(wins0 / wins1).
    s = bradley_terry(np.array([[0.0, 3.0], [1.0, 0.0]]), l2=1e-9)
    assert s[0] - s[1] == pytest.approx(math.log(3.0), abs=1e-6)
    assert s.sum() == pytest.approx(0.0, abs=1e-12)


def test_bt_known_strengths_from_expected_counts():
    true = np.array([1.5, 0.5, 0.0, -0.25, -1.75])
    games = 1000.0
    wins = games * sigmoid(true[:, None] - true[None, :])
    np.fill_diagonal(wins, 0.0)
    s = bradley_terry(wins)
    np.testing.assert_allclose(s, true - true.mean(), atol=1e-4)


@given(
    st.integers(3, 8).flatmap(lambda k: st.lists(st.floats(-2.0, 2.0), min_size=k, max_size=k)),
    st.integers(0, 2**32 - 1),
)
@FAST
def test_bt_recovers_strengths_from_sampled_wins(true, seed):
    true = np.array(true)
    rng = np.random.default_rng(seed)
    wins = rng.binomial(2000, sigmoid(true[:, None] - true[None, :])).astype(float)
    np.fill_diagonal(wins, 0.0)
    s = bradley_terry(wins)
    # 2000 games per ordered pair: standard error ~0.02-0.08 per strength (the largest for
    # strengths at +-2 with k=3); 0.4 is 5 of them (0.25 failed 53 of 20,000 seeds at [2, -2, -2]).
    assert np.max(np.abs(s - (true - true.mean()))) < 0.4
    if np.ptp(true) > 0.5:
        assert np.corrcoef(s, true)[0, 1] > 0.98


def square_counts(max_k: int, max_count: int):
    """(k, k*k non-negative counts) for a k x k win matrix."""
    return st.integers(2, max_k).flatmap(
        lambda k: st.tuples(st.just(k), st.lists(st.integers(0, max_count), min_size=k * k, max_size=k * k))
    )


def test_bt_converges_where_steps_shrink_below_float_noise():
    """A draw of the test below whose fit stopped ~1.6e-6 short: near the optimum the line search
    refused Newton steps whose gain was smaller than the objective's rounding."""
    wins = np.array([[0] * 8, [0, 0, 4, 5, 0, 4, 4, 2], [6, 0, 0, 0, 0, 6, 1, 1], [1, 6, 4, 0, 3, 4, 2, 3],
                     [3, 5, 4, 4, 0, 1, 5, 0], [5, 5, 2, 5, 6, 0, 1, 3], [0] * 8, [5, 5, 6, 6, 1, 0, 0, 0]],
                    dtype=float)
    perm = [7, 0, 5, 2, 3, 1, 6, 4]
    np.testing.assert_allclose(bradley_terry(wins[np.ix_(perm, perm)]), bradley_terry(wins)[perm], atol=1e-9)


@given(square_counts(8, 6), st.randoms())
@FAST
def test_bt_is_invariant_to_candidate_order(k_counts, rnd):
    k, counts = k_counts
    wins = np.array(counts, dtype=float).reshape(k, k)
    np.fill_diagonal(wins, 0.0)
    perm = list(range(k))
    rnd.shuffle(perm)
    s = bradley_terry(wins)
    s_perm = bradley_terry(wins[np.ix_(perm, perm)])
    np.testing.assert_allclose(s_perm, s[perm], atol=1e-7)
    assert abs(s.mean()) < 1e-9


@given(square_counts(6, 5), st.data())
@FAST
def test_bt_one_more_win_raises_the_winner(k_counts, data):
    k, counts = k_counts
    wins = np.array(counts, dtype=float).reshape(k, k)
    np.fill_diagonal(wins, 0.0)
    i = data.draw(st.integers(0, k - 1))
    j = data.draw(st.integers(0, k - 1).filter(lambda x: x != i))
    before = bradley_terry(wins)
    wins[i, j] += 1
    after = bradley_terry(wins)
    assert after[i] - after[j] > before[i] - before[j] + 1e-9
    assert after[i] > before[i]


def test_bt_stays_finite_when_one_candidate_wins_everything():
    wins = np.zeros((4, 4))
    wins[0, 1:] = 5.0  # 0 beats everyone, the others never meet
    s = bradley_terry(wins)
    assert np.all(np.isfinite(s))
    assert s[0] == s.max() and s[0] > 2.0
    np.testing.assert_allclose(s[1:], s[1], atol=1e-9)  # symmetric losers
    assert abs(s.sum()) < 1e-9


def test_bt_disconnected_components_are_centred_by_the_prior():
    wins = np.zeros((4, 4))
    wins[0, 1] = 3.0
    wins[1, 0] = 1.0
    wins[2, 3] = 3.0
    wins[3, 2] = 1.0
    s = bradley_terry(wins)
    np.testing.assert_allclose(s, [s[0], -s[0], s[0], -s[0]], atol=1e-9)
    assert s[0] - s[1] == pytest.approx(math.log(3.0), abs=1e-2)


def test_bt_edge_sizes_and_no_games():
    assert bradley_terry(np.zeros((0, 0))).shape == (0,)
    np.testing.assert_array_equal(bradley_terry(np.zeros((1, 1))), [0.0])
    np.testing.assert_array_equal(bradley_terry(np.zeros((3, 3))), [0.0, 0.0, 0.0])


@pytest.mark.parametrize(
    "wins, l2",
    [
        (np.zeros((2, 3)), 1e-3),
        (np.array([[0.0, -1.0], [0.0, 0.0]]), 1e-3),
        (np.array([[1.0, 0.0], [0.0, 0.0]]), 1e-3),
        (np.array([[0.0, np.nan], [0.0, 0.0]]), 1e-3),
        (np.zeros((2, 2)), 0.0),
    ],
)
def test_bt_rejects_bad_input(wins, l2):
    with pytest.raises(TPODataError):
        bradley_terry(wins, l2=l2)


def test_bt_is_fast_at_k8():
    rng = np.random.default_rng(0)
    mats = []
    for _ in range(200):
        w = rng.integers(0, 3, size=(8, 8)).astype(float)
        np.fill_diagonal(w, 0.0)
        mats.append(w)
    start = time.perf_counter()
    for w in mats:
        bradley_terry(w)
    # ~0.3 ms each on one core; the bound leaves room for a loaded machine.
    assert time.perf_counter() - start < 5.0


# --- length control -----------------------------------------------------------


def test_length_controlled_hand_computed():
    # z(scores) = (x - 2) / sqrt(2/3); z(lengths) = (x - 30) / sqrt(1400/3).
    s = length_controlled([1.0, 2.0, 3.0], [10, 20, 60], rho=0.5)
    zs = np.array([-1.224745, 0.0, 1.224745])
    zl = np.array([-0.925820, -0.462910, 1.388730])
    np.testing.assert_allclose(s, zs - 0.5 * zl, atol=1e-6)
    np.testing.assert_allclose(s, [-0.761835, 0.231455, 0.530380], atol=1e-6)


def test_length_controlled_rho_zero_is_plain_z():
    np.testing.assert_allclose(length_controlled([0.0, 4.0], [5, 900], 0.0), [-1.0, 1.0])


def test_zero_spread_contributes_zero():
    np.testing.assert_allclose(length_controlled([1.0, 3.0], [50, 50], 0.5), [-1.0, 1.0])
    np.testing.assert_allclose(length_controlled([0.7, 0.7], [10, 30], 0.2), [0.2, -0.2])
    np.testing.assert_array_equal(length_controlled([0.1] * 5, [7] * 5, 0.5), np.zeros(5))


@pytest.mark.parametrize("rho", [-0.01, 0.51, float("nan"), 1, "0.1"])
def test_rho_out_of_range(rho):
    with pytest.raises(TPODataError, match="rho"):
        length_controlled([1.0, 2.0], [1, 2], rho)


def test_rho_bounds_are_allowed():
    assert length_controlled([1.0, 2.0], [1, 2], 0).shape == (2,)
    assert length_controlled([1.0, 2.0], [1, 2], 0.5).shape == (2,)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scores_raise(bad):
    with pytest.raises(TPODataError, match="check_finite"):
        length_controlled([1.0, bad], [1, 2], 0.1)


def test_check_finite_mask():
    mask = check_finite([1.0, float("nan"), float("inf"), None, -2.0])
    np.testing.assert_array_equal(mask, [True, False, False, False, True])


def test_length_controlled_shape_mismatch():
    with pytest.raises(TPODataError):
        length_controlled([1.0, 2.0], [1], 0.1)


# --- auto_rho -------------------------------------------------------------------


def test_auto_rho_picks_smallest_satisfying_rho():
    groups = [
        # rho=0 picks the 300-char sample; from rho ~0.0908 on the 100-char one wins.
        ([1.0, 0.9, 0.0], [300, 100, 200], [True, True, True]),
        ([0.0, 1.0], [100, 100], [True, True]),
    ]
    result = auto_rho(groups)
    assert result.rho == pytest.approx(0.1)
    assert result.satisfied
    assert result.mean_chosen_length == pytest.approx(100.0)
    assert result.mean_rejected_length == pytest.approx(150.0)
    assert result.n_pairs == 2
    # Just below the threshold the longer sample is still chosen.
    assert auto_rho(groups, grid=[0.0, 0.075]).satisfied is False


def test_auto_rho_reports_when_unsatisfiable():
    result = auto_rho([([10.0, 0.0], [200, 100], [True, True])])
    assert result.rho == 0.5
    assert not result.satisfied
    assert (result.mean_chosen_length, result.mean_rejected_length) == (200.0, 100.0)


def test_auto_rho_tunes_on_the_judged_pairs():
    # The rejected parse failure's raw output (3000 chars) is no response length: counted, it
    # would make rho 0 look satisfied while the judged pair keeps its longest answer.
    failure = ([math.nan, 2.0, 1.0], [3000, 900, 200], [False, True, True])
    judged = [([1.0, 0.9, 0.0], [300, 100, 200], [True] * 3), ([0.0, 1.0], [100, 100], [True] * 2)]
    alone = auto_rho(judged)
    assert alone.rho == pytest.approx(0.1) and alone.satisfied  # as in the first test above
    result = auto_rho([failure, *judged])
    assert (result.rho, result.satisfied, result.n_pairs) == (alone.rho, True, 2)
    assert (result.mean_chosen_length, result.mean_rejected_length) == (
        alone.mean_chosen_length, alone.mean_rejected_length)


def test_auto_rho_without_a_judged_pair_is_not_tuned():
    # Every pair rejects a parse failure: no rejected response to compare, nothing is claimed.
    groups = [([math.nan, 2.0, 1.0], [3000, 900, 200], [False, True, True]),
              ([math.nan, 1.0, 0.5], [2500, 800, 150], [False, True, True])]
    result = auto_rho(groups)
    assert (result.rho, result.satisfied, result.n_pairs) == (0.0, None, 0)
    # A truncated sample is rejected whatever rho is, too: its length (cut at the limit) would make
    # rho 0 look satisfied while the one pair that s decided keeps its longest answer.
    cut = ([1.0, 0.9, 0.0], [300, 100, 2000], [True, True, True], [False, False, True])
    result = auto_rho([*groups, cut])
    assert (result.rho, result.satisfied, result.n_pairs) == (0.0, None, 0)
    decided = ([1.0, 0.9, 0.0], [300, 100, 200], [True] * 3)
    assert auto_rho([*groups, cut, decided]) == auto_rho([decided])


def test_auto_rho_checks_pairs_that_only_larger_rho_keeps():
    # With length_breaks_ties an equal-score group is a pair only from rho > 0: a group that
    # rejects a parse failure beside it must not stop the search at rho 0 as "not tuned".
    tie = ([1.0, 1.0], [100, 300], [True, True])
    failure = ([math.nan, 2.0, 1.0], [3000, 900, 200], [False, True, True])
    alone = auto_rho([tie], length_breaks_ties=True)
    assert alone.rho > 0 and alone.satisfied and alone.n_pairs == 1
    assert auto_rho([tie, failure], length_breaks_ties=True) == alone


def test_auto_rho_tunes_on_the_pairs_that_are_written():
    # A long parse failure makes rho 0 look satisfied, but without rejecting parse
    # failures the written pair is (300 chars, 250 chars) until rho makes the 200-char one chosen.
    group = ([2.0, 1.8, 0.0, math.nan], [300, 200, 250, 2000], [True, True, True, False])
    assert auto_rho([group]).rho == 0.0
    result = auto_rho([group], reject_parse_failures=False)
    assert result.satisfied and result.rho > 0
    assert result.mean_chosen_length <= result.mean_rejected_length


def test_auto_rho_with_no_pairs():
    result = auto_rho([([1.0], [10], [True])], grid=[0.0, 0.2])
    assert (result.rho, result.satisfied, result.n_pairs) == (0.2, False, 0)
    assert math.isnan(result.mean_chosen_length)


def test_auto_rho_validates_grid():
    with pytest.raises(TPODataError):
        auto_rho([], grid=[])
    with pytest.raises(TPODataError):
        auto_rho([], grid=[0.1, 0.7])


group_strategy = st.integers(2, 6).flatmap(
    lambda k: st.tuples(
        st.lists(st.floats(-3, 3), min_size=k, max_size=k),
        st.lists(st.integers(1, 3000), min_size=k, max_size=k),
        st.lists(st.booleans(), min_size=k, max_size=k),
    )
)


@given(st.lists(group_strategy, min_size=1, max_size=6), st.booleans(), st.booleans())
@settings(max_examples=60, deadline=None)
def test_auto_rho_is_the_first_grid_value_that_satisfies(groups, reject_failures, length_ties):
    options = {"reject_parse_failures": reject_failures, "length_breaks_ties": length_ties}
    result = auto_rho(groups, **options)

    def judged(rho):
        return [p for _, p in select_pairs(groups, rho, **options).pairs
                if p.rejected_parsed and not p.rejected_truncated]

    def holds(rho):
        pairs = judged(rho)
        return bool(pairs) and np.mean([p.chosen_length for p in pairs]) <= np.mean(
            [p.rejected_length for p in pairs]
        )

    checkable = [r for r in DEFAULT_RHO_GRID if judged(r)]
    if not checkable:
        kept = any(select_pairs(groups, r, **options).pairs for r in DEFAULT_RHO_GRID)
        expected = (DEFAULT_RHO_GRID.min(), None) if kept else (DEFAULT_RHO_GRID.max(), False)
        assert (result.rho, result.satisfied) == expected
        return

    smaller = [r for r in DEFAULT_RHO_GRID if r < result.rho]
    assert not any(holds(r) for r in smaller)
    assert holds(result.rho) == result.satisfied
    if not result.satisfied:
        assert result.rho == max(checkable)


# --- position bias --------------------------------------------------------------


@FAST
@given(st.integers(0, 60).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_first_position_p_value_is_the_exact_two_sided_binomial(case):
    first, n = case
    # Independent reference: every outcome at most as likely as the observed one (P = 1/2).
    probs = [math.comb(n, i) / 2**n for i in range(n + 1)]
    expected = min(1.0, sum(p for p in probs if p <= probs[first] * (1 + 1e-9)))
    assert first_position_p_value(first, n) == pytest.approx(expected, rel=1e-9)
    assert first_position_p_value(first, n) == pytest.approx(first_position_p_value(n - first, n))


def test_first_position_p_value_known_values_and_large_counts():
    assert first_position_p_value(24, 24) == pytest.approx(2 / 2**24)
    assert first_position_p_value(8, 10) == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert first_position_p_value(0, 0) == 1.0
    # 5,000 calls: no underflow; 2,600 A wins is 2.83 standard deviations from half.
    assert first_position_p_value(2600, 5000) == pytest.approx(0.0047, abs=3e-4)
    with pytest.raises(TPODataError, match="between 0 and decided"):
        first_position_p_value(5, 4)


@pytest.mark.parametrize("first, decided, biased", [
    (24, 24, True), (0, 24, True), (13, 24, False),
    (8, 10, False),       # 80%, but 10 calls could do that by chance (p = 0.11)
    (700, 1000, True), (300, 1000, True),
    (560, 1000, False),   # clearly not 50% (p < 0.001), but too weak to decide close calls
    (0, 0, False),
])
def test_position_biased(first, decided, biased):
    assert position_biased(first, decided) is biased

"""Win rates of the held-out evaluation: both orders, ties as half, per category."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tpo_data.eval_metrics import (
    by_category,
    order_points,
    outcome,
    output_stats,
    shown_response,
    win_rate,
)

verdict = st.sampled_from([-1, 0, 1])


def test_order_points():
    assert order_points(1, True) == 1.0 and order_points(-1, True) == 0.0
    assert order_points(1, False) == 0.0 and order_points(-1, False) == 1.0
    assert order_points(0, True) == order_points(0, False) == 0.5
    with pytest.raises(ValueError):
        order_points(2, True)


def test_outcome_cases():
    # X wins when shown as A (r=+1) and when shown as B (r=-1): a clean win.
    assert outcome(1, -1) == 1.0
    assert outcome(-1, 1) == 0.0
    # A judge that always names position A (or B) cannot favour either model.
    assert outcome(1, 1) == 0.5 and outcome(-1, -1) == 0.5
    assert outcome(0, 0) == 0.5
    assert outcome(1, 0) == 0.75 and outcome(0, 1) == 0.25


@given(verdict, verdict)
def test_outcome_is_antisymmetric(r1, r2):
    # Swapping the roles of X and Y (same two judge calls) gives Y's outcome = 1 - X's.
    assert outcome(r1, r2) + outcome(r2, r1) == 1.0


def test_win_rate_and_interval():
    w = win_rate([1.0, 1.0, 0.5, 0.0])
    assert w.rate == pytest.approx(0.625) and w.n == 4 and w.wins == 2 and w.losses == 1
    sd = math.sqrt(sum((x - 0.625) ** 2 for x in [1.0, 1.0, 0.5, 0.0]) / 3)
    assert w.ci95 == pytest.approx(1.96 * sd / 2)
    assert w.as_dict()["split_or_tied"] == 1
    assert win_rate([1.0, 0.75, 0.25, 0.5]).as_dict()["split_or_tied"] == 3  # not only true ties
    empty = win_rate([])
    assert empty.n == 0 and math.isnan(empty.rate)
    single = win_rate([1.0])  # no spread to estimate from one instruction
    assert single.rate == 1.0 and single.ci95 is None


def test_by_category():
    rates = by_category([1.0, 0.0, 0.5, 1.0], ["math", "coding", "math", "math"])
    assert list(rates) == ["coding", "math"]
    assert rates["coding"].rate == 0.0 and rates["math"].rate == pytest.approx(2.5 / 3)
    with pytest.raises(ValueError):
        by_category([1.0], ["a", "b"])


def test_shown_response_and_output_stats():
    assert shown_response("T\nHere is my response: R", "R", True) == "R"
    assert shown_response("no separator", None, False) == "no separator"
    rows = [
        {"generation": ["tt R"], "thoughts": ["tt"], "responses": ["R"], "parsed": [True]},
        {"generation": ["raw output"], "thoughts": [None], "responses": [None], "parsed": [False]},
        {"generation": ["tttt RRR"], "thoughts": ["tttt"], "responses": ["RRR"], "parsed": [True]},
    ]
    stats = output_stats(rows)
    assert stats["samples"] == 3 and stats["parsed"] == 2
    assert stats["parse_rate"] == pytest.approx(2 / 3)
    assert stats["mean_thought_chars"] == 3 and stats["mean_response_chars"] == 2
    assert stats["mean_shown_chars"] == pytest.approx((1 + 10 + 3) / 3)


def test_position_note_only_for_a_clearly_biased_llm_judge():
    from tpo_data.eval_report import position_note

    note = position_note({"calls": 40, "unparsable": 4, "first_wins": 36})
    assert "won 36 of 36 decided calls (100%)" in note and "--judge_model" in note
    assert position_note({"calls": 40, "unparsable": 4, "first_wins": 20}) == ""
    assert position_note({"calls": 40, "unparsable": 0, "first_wins": None}) == ""  # a reward model
    assert position_note({"calls": 40, "unparsable": 0}) == ""  # a report from before the count

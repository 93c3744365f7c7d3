"""Splitting thought from response: property tests over generated texts."""


import re

from hypothesis import given, strategies as st

from tpo_data.parsing import separator_pattern, split_output
from tpo_data.prompts import PRESETS

GENERIC = PRESETS["generic"]
SPECIFIC = PRESETS["specific"]

# Text that cannot itself contain a separator variant.
safe_text = st.text(
    alphabet=st.characters(blacklist_characters="<>", blacklist_categories=("Cs",)), max_size=200
).filter(lambda t: not separator_pattern(GENERIC.separator).search(t)
         and not re.search(r"response", t, re.I))

# A colon or emphasis marker right after the separator belongs to the separator
# ("Here is my response:**"), so responses starting with one are out of scope.
response_text = safe_text.filter(
    lambda t: t.strip() and not t.lstrip().startswith((":", "**", "__"))
)

thought_text = safe_text.filter(lambda t: not t.rstrip(" \t").endswith(("**", "__", "#")))


@given(thought=thought_text, response=response_text)
def test_generic_round_trip(thought, response):
    text = f"Here is my thought process: {thought}\nHere is my response: {response}"
    split = split_output(text, GENERIC.separator, GENERIC.thought_marker)
    assert split.parsed
    assert split.response == response.strip()
    assert split.thought == thought.strip()


@given(thought=thought_text, response=response_text)
def test_specific_round_trip(thought, response):
    split = split_output(f"{thought}<R>{response}", SPECIFIC.separator)
    assert split.parsed and split.response == response.strip() and split.thought == thought.strip()


@given(text=safe_text)
def test_no_separator_is_a_parse_failure(text):
    split = split_output(text, GENERIC.separator, GENERIC.thought_marker)
    assert split == split_output("", GENERIC.separator) and not split.parsed
    assert split.thought == "" and split.response == ""


def test_common_variants_are_accepted():
    variants = [
        "Here's my response: ok", "here is my response\nok", "**Here is my response:** ok",
        "**Here is my response**: ok", "Here is my response**\nok",
        "Here is my final response: ok", "HERE IS MY RESPONSE:\nok", "## Here’s my response\nok",
    ]
    for text in variants:
        split = split_output("thinking. " + text, GENERIC.separator, GENERIC.thought_marker)
        assert split.parsed, text
        assert split.response == "ok", text
        assert split.thought == "thinking.", text


def test_last_separator_with_text_wins_and_empty_response_fails():
    text = "Plan: I will write after <R>. Draft: x <R> Final answer"
    assert split_output(text, "<R>").response == "Final answer"
    assert split_output(text, "<R>").thought == "Plan: I will write after <R>. Draft: x"
    assert not split_output("thought only <R>   ", "<R>").parsed


def test_direct_mode_keeps_whole_output():
    split = split_output("  Just an answer. ", None)
    assert split.parsed and split.response == "Just an answer." and split.thought == ""
    assert not split_output("   ", None).parsed


def test_a_separator_mentioned_in_the_response_does_not_cut_it():
    # Seen in SmolLM2 outputs and in a review: mentions mid-sentence are not separators,
    # and a separator that starts a line wins over one inside a sentence.
    cases = [
        ("I think 6*7=42.\nANSWER: The answer is 42.", "ANSWER:", "The answer is 42."),
        ("thoughts\nHere is my response: Dear Sir, here is my response to your offer: I accept.",
         GENERIC.separator, "Dear Sir, here is my response to your offer: I accept."),
        ("thought\nHere is my response:\nAnswer A.\n\nHere's my response time: 5ms.",
         GENERIC.separator, "Answer A.\n\nHere's my response time: 5ms."),
        ("thinking...\n<R>\nThe answer is <r>x</r> in HTML", SPECIFIC.separator, "The answer is <r>x</r> in HTML"),
        ("Here is my response:\n\nHere is my response:\n\nBinary search halves. Quoting "
         "\"Here is my response:\" here.", GENERIC.separator,
         "Binary search halves. Quoting \"Here is my response:\" here."),
    ]
    for text, separator, response in cases:
        assert split_output(text, separator).response == response, text
    # A quoted mention with nothing that starts a line is not a separator at all.
    text = 'I changed "Here is my thought process" to "Here is my response" to make it concise.'
    assert not split_output(text, GENERIC.separator, GENERIC.thought_marker).parsed
    assert not split_output("The responses differ; my responsibility: none.", "response:").parsed

"""Thought prompt presets and custom template validation."""

import pytest

from tpo_data.errors import TPODataError
from tpo_data.prompts import PRESETS, load_prompt, validate_template


def test_presets_follow_the_paper():
    generic = PRESETS["generic"].messages("Name a color.")
    assert generic == [{"role": "user", "content": generic[0]["content"]}]
    assert generic[0]["content"].endswith("User query: Name a color.")
    assert '"Here is my thought process:"' in generic[0]["content"]
    assert PRESETS["specific"].separator == "<R>"
    assert "draft response and its evaluation" in PRESETS["specific"].user
    system = PRESETS["system"].messages("Name a color.")
    assert [m["role"] for m in system] == ["system", "user"]
    assert system[1]["content"] == "Name a color."
    assert PRESETS["direct"].separator is None


def test_braces_in_instructions_are_kept_literally():
    msg = PRESETS["generic"].messages('Return {"a": 1} as JSON {instruction}')
    assert msg[0]["content"].endswith('User query: Return {"a": 1} as JSON {instruction}')


@pytest.mark.parametrize(
    "user, separator, message",
    [
        ("No placeholder. Answer after <R>.", "<R>", "placeholder {instruction} exactly once (found 0)"),
        ("{instruction} {instruction} <R>", "<R>", "exactly once (found 2)"),
        ("Answer: {instruction}", "", "a response separator is required"),
        ("Answer: {instruction}", "<R>", "must appear in the prompt text"),
    ],
)
def test_invalid_templates_say_what_is_missing(user, separator, message):
    with pytest.raises(TPODataError) as err:
        validate_template(user, separator)
    assert message in str(err.value)
    assert "How to fix" in str(err.value)


def test_template_files(tmp_path):
    good = tmp_path / "mine.yaml"
    good.write_text("user: 'Think, then answer after ANSWER:. Query: {instruction}'\nseparator: 'ANSWER:'\n")
    prompt = load_prompt(str(good))
    assert prompt.name == "mine" and prompt.separator == "ANSWER:"
    bad = tmp_path / "bad.yaml"
    bad.write_text("separator: 'ANSWER:'\n")
    with pytest.raises(TPODataError, match="no 'user' template"):
        load_prompt(str(bad))
    with pytest.raises(TPODataError, match="not a preset and not a file"):
        load_prompt("genric")

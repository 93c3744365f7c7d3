"""Split a model output into thought and response (METHOD.md 1.3).

Pure string logic. The separator is matched loosely, because small models
paraphrase it: case, whitespace, "Here is"/"Here's", an optional "final" and
markdown emphasis around it are all accepted, and a separator ending in a
colon may end its line instead ("Here is my response\n"). It is not a
separator when the sentence goes on ("here is my response to your offer:",
"my response time: 5 ms") or inside a longer word.

Which occurrence splits: the LAST one followed by text, so a draft that
mentions the separator inside the thought does not cut the thought short;
occurrences that start a line (after markdown) come first, so a response
that quotes the separator mid-sentence is not cut short either.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class Split:
    thought: str
    response: str
    parsed: bool


# Markdown a model may wrap the separator in: "## Here is my response", "**<R>**".
# Only emphasis markers touching the separator are consumed, so a response that
# starts with its own heading or bullet keeps it.
_BEFORE = r"(?:#{1,6}[ \t]*|\*\*|__)?"
_AFTER = r"(?:\*\*|__)?"


def _loose(phrase: str) -> str:
    """Regex for a phrase that tolerates the variants small models produce."""
    words = phrase.strip().rstrip(":").split()
    parts = []
    for i, word in enumerate(words):
        low = word.lower()
        if low == "here" and i + 1 < len(words) and words[i + 1].lower() == "is":
            parts.append(r"here(?:\s+is|'s|’s)")
            continue
        if low == "is" and i > 0 and words[i - 1].lower() == "here":
            continue
        if low == "my":
            parts.append(r"my(?:\s+final)?")
            continue
        parts.append(re.escape(word))
    body = r"\s*".join(parts) if phrase.strip().startswith("<") else r"\s+".join(parts)
    if phrase.strip().endswith(":"):
        # The colon (inside or after emphasis), or the end of the line.
        return body + r"(?:\*\*|__)?(?:[ \t]*:|(?=[ \t]*(?:\*\*|__)?[ \t]*(?:\r?\n|$)))"
    return body + (r"(?!\w)" if re.search(r"\w$", phrase.strip()) else "") + r"[ \t]*:?"


@lru_cache(maxsize=64)
def separator_pattern(separator: str) -> re.Pattern[str]:
    return re.compile(_BEFORE + _loose(separator) + _AFTER, re.IGNORECASE)


def _starts_line(text: str, start: int) -> bool:
    return not text[text.rfind("\n", 0, start) + 1 : start].strip()


def split_output(text: str, separator: str | None, thought_marker: str | None = None) -> Split:
    """Split ``text`` at its separator (module docstring: which occurrence, which variants).

    With no separator (direct-response mode) the whole text is the response.
    Outputs without a usable separator are parse failures: ``parsed=False`` and
    empty thought/response, so they can never be judged as a response.
    """
    if separator is None:
        response = text.strip()
        return Split("", response, bool(response))
    found = [m for m in separator_pattern(separator).finditer(text) if text[m.end():].strip()]
    if not found:
        return Split("", "", False)
    match = ([m for m in found if _starts_line(text, m.start())] or found)[-1]
    thought = text[: match.start()].strip()
    if thought_marker:
        marker = separator_pattern(thought_marker).match(thought)
        if marker:
            thought = thought[marker.end():].strip()
    return Split(thought, text[match.end():].strip(), True)

"""Split a model output into thought and response (METHOD.md 1.3).

Pure string logic. The separator is matched loosely, because small models
paraphrase it: case, whitespace, "Here is"/"Here's", an optional "final",
a missing colon and markdown emphasis around it are all accepted. The LAST
separator followed by text wins, so a draft that mentions the separator
inside the thought does not cut the thought short.
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
    return body + r"\s*:?"


@lru_cache(maxsize=64)
def separator_pattern(separator: str) -> re.Pattern[str]:
    return re.compile(_BEFORE + _loose(separator) + _AFTER, re.IGNORECASE)


def split_output(text: str, separator: str | None, thought_marker: str | None = None) -> Split:
    """Split ``text`` at the last ``separator`` variant followed by a non-empty response.

    With no separator (direct-response mode) the whole text is the response.
    Outputs without a usable separator are parse failures: ``parsed=False`` and
    empty thought/response, so they can never be judged as a response.
    """
    if separator is None:
        response = text.strip()
        return Split("", response, bool(response))
    for match in reversed(list(separator_pattern(separator).finditer(text))):
        response = text[match.end():].strip()
        if response:
            thought = text[: match.start()].strip()
            if thought_marker:
                marker = separator_pattern(thought_marker).match(thought)
                if marker:
                    thought = thought[marker.end():].strip()
            return Split(thought, response, True)
    return Split("", "", False)

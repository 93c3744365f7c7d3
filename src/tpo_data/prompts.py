"""Thought prompts: the paper's presets and validated custom templates.

A prompt wraps an instruction so the model writes a thought first and its
response after a separator (METHOD.md 1.2). Templates use a single
``{instruction}`` placeholder, filled with ``str.replace`` so braces in user
instructions (code, JSON) are never interpreted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from tpo_data.errors import TPODataError

PLACEHOLDER = "{instruction}"

GENERIC_TEXT = (
    "Respond to the following user query in a comprehensive and detailed way. You can write "
    'down your thought process before responding. Write your thoughts after "Here is my '
    'thought process:" and write your response after "Here is my response:".'
)
SPECIFIC_TEXT = (
    "Respond to the following user query in a comprehensive and detailed way. But first write "
    "down your internal thoughts. This must include your draft response and its evaluation. "
    'After this, write your final response after "<R>".'
)


@dataclass(frozen=True)
class ThoughtPrompt:
    """How an instruction is shown to the policy and how its output is split.

    ``separator`` is None only for the direct-response baseline, whose whole
    output is the response.
    """

    name: str
    user: str
    separator: str | None
    system: str | None = None
    thought_marker: str | None = None

    def messages(self, instruction: str) -> list[dict[str, str]]:
        user = self.user.replace(PLACEHOLDER, instruction)
        if self.system is None:
            return [{"role": "user", "content": user}]
        return [{"role": "system", "content": self.system}, {"role": "user", "content": user}]


PRESETS: dict[str, ThoughtPrompt] = {
    "generic": ThoughtPrompt(
        name="generic",
        user=GENERIC_TEXT + "\n\nUser query: " + PLACEHOLDER,
        separator="Here is my response:",
        thought_marker="Here is my thought process:",
    ),
    "specific": ThoughtPrompt(
        name="specific",
        user=SPECIFIC_TEXT + "\nUser query: " + PLACEHOLDER,
        separator="<R>",
    ),
    # The paper's "system" variant: the generic text moves to the system prompt.
    "system": ThoughtPrompt(
        name="system",
        system=GENERIC_TEXT,
        user=PLACEHOLDER,
        separator="Here is my response:",
        thought_marker="Here is my thought process:",
    ),
    # The paper's control: no thought, the whole output is the response.
    "direct": ThoughtPrompt(name="direct", user=PLACEHOLDER, separator=None),
}


def validate_template(
    user: str, separator: str | None, system: str | None = None, name: str = "custom"
) -> ThoughtPrompt:
    """Build a custom prompt, refusing templates the splitter could not use."""
    missing = []
    if not isinstance(user, str) or user.count(PLACEHOLDER) != 1:
        found = user.count(PLACEHOLDER) if isinstance(user, str) else 0
        missing.append(
            f"the user template must contain the placeholder {PLACEHOLDER} exactly once "
            f"(found {found})"
        )
    if not separator or not str(separator).strip():
        missing.append("a response separator is required (e.g. 'Here is my response:')")
    elif separator not in (system or "") + user:
        missing.append(
            f"the separator {separator!r} must appear in the prompt text, "
            "so the model knows where its response starts"
        )
    if missing:
        raise TPODataError(
            f"Invalid thought prompt template {name!r}: " + "; ".join(missing) + ".",
            "Fix the template file, or use a preset: --thought_prompt generic|specific|system.",
        )
    return ThoughtPrompt(name=name, user=user, separator=separator, system=system)


def load_prompt(spec: str) -> ThoughtPrompt:
    """Resolve ``--thought_prompt``: a preset name or a YAML file with user/separator/system."""
    if spec in PRESETS:
        return PRESETS[spec]
    path = Path(spec)
    if not path.is_file():
        raise TPODataError(
            f"Unknown thought prompt {spec!r}: not a preset and not a file.",
            f"Use one of {sorted(PRESETS)} or a YAML file with keys 'user', 'separator' "
            "and optionally 'system'.",
        )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise TPODataError(
            f"Thought prompt file {path} is not valid YAML: {err}",
            "Write it as YAML with keys 'user', 'separator' and optionally 'system'.",
        ) from None
    if not isinstance(data, dict) or "user" not in data:
        raise TPODataError(
            f"Thought prompt file {path} has no 'user' template.",
            "Add a 'user' key whose text contains {instruction} and a 'separator' key.",
        )
    return validate_template(
        data["user"], data.get("separator"), data.get("system"), name=path.stem
    )

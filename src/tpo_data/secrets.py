"""Keep credentials out of everything tpo-data writes or prints.

Cards, manifests, logs, pipeline.yaml copies and error messages all pass through
:func:`scrub`. It masks Hugging Face token shapes (``hf_...``, ``api_org_...``),
``Authorization: Bearer ...`` values, passwords in URLs (``https://user:key@host``),
and the literal values of the credential environment variables and of any secret
registered at run time (for example a token passed as an argument instead of
through the environment, or the endpoint key read from ``--api_key_env``).
:func:`scrub_log_records` applies the same rules to every log record.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

SECRET_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "ARGILLA_API_KEY", "OPENAI_API_KEY")
MASK = "***"

# Real tokens are "hf_" + 34 alphanumerics; 20+ keeps names such as hf_hub_download safe.
_TOKEN_PATTERNS = (
    re.compile(r"\bhf_[A-Za-z0-9]{20,}"),
    re.compile(r"\bapi_org_[A-Za-z0-9]{20,}"),
    # No backslash: in JSON or YAML text, `bearer \"x` must keep its escape (the file stays valid).
    re.compile(r"(?i)(bearer\s+)[^\s'\",;\\]+"),
    # The password of a URL's user-info (an endpoint or proxy with basic auth); "git@" has none.
    re.compile(r"(://[^/@\s:'\",;\\]*:)[^/@\s'\",;\\]+(?=@)"),
)
# Very short values would mask ordinary words; nobody uses them as real secrets.
_MIN_SECRET_LENGTH = 8

_registered: set[str] = set()


def register(value: str | None) -> None:
    """Treat ``value`` as a secret from now on (no-op for empty or very short values)."""
    if value and len(value) >= _MIN_SECRET_LENGTH:
        _registered.add(value)


def secret_values() -> list[str]:
    """The literal secrets to mask: credential env vars plus registered values, longest first."""
    values = {os.environ.get(name, "") for name in SECRET_ENV_VARS} | _registered
    # Longest first so a secret that contains another is masked whole.
    return sorted((v for v in values if len(v) >= _MIN_SECRET_LENGTH), key=len, reverse=True)


def scrub(text: str) -> str:
    """Return ``text`` with every secret value and token-shaped string replaced by ``***``."""
    for value in secret_values():
        text = text.replace(value, MASK)
    for pattern in _TOKEN_PATTERNS:
        if pattern.groups:
            text = pattern.sub(lambda m: m.group(1) + MASK, text)
        else:
            text = pattern.sub(MASK, text)
    return text


def scrub_log_records() -> None:
    """Scrub every log record this process (and any worker it forks) creates from now on.

    At the record, not at a handler: distilabel replaces the root handlers during a run
    (its console handler and its ``pipeline.log``), and libraries bring their own. Idempotent.
    """
    make = logging.getLogRecordFactory()
    if getattr(make, "scrubs", False):
        return

    def scrubbed(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed call: logging reports it at emit time, as it would have
            return record
        if record.exc_info:
            # A formatted traceback carries the exception's text; fold it in so it is scrubbed too.
            message += "\n" + logging.Formatter().formatException(record.exc_info)
            record.exc_info, record.exc_text = None, None
        record.msg, record.args = scrub(message), None
        return record

    scrubbed.scrubs = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(scrubbed)

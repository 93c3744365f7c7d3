"""Crash-safe files: atomic writes (the old file or the new one, never half of one),
append-only JSON-lines logs that survive a process killed mid-write, and file hashes."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, fsync it, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder, so os.replace is a rename; the name starts with a dot and does not end
    # like the target, so globs for finished files (*.jsonl) never see a half-written one.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_jsonl_log(path: Path) -> list[Any]:
    """The entries of an append-only JSON-lines log, skipping the torn last line of a run
    killed mid-write; the file is left ending in a newline, so the next append starts a line."""
    if not path.is_file():
        return []
    # Logs are written ASCII (json.dumps escapes): a torn write cannot split a character.
    text = path.read_text("ascii", errors="replace")
    entries = []
    for line in text.splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    if text and not text.endswith("\n"):
        with path.open("a", encoding="ascii") as fh:
            fh.write("\n")
    return entries


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()

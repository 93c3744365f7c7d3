"""Errors a user can act on.

Every error raised for bad input or a broken environment names the problem and
the fix, so the CLI can print it without a traceback and exit non-zero.
"""

from __future__ import annotations


class TPODataError(Exception):
    """A problem the user can fix. ``str(err)`` says what is wrong and how to fix it."""

    def __init__(self, problem: str, fix: str):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}\n  How to fix: {fix}")

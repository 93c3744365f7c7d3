"""``tpo-data`` command line and the error handling shared by the scripts.

A :class:`TPODataError` is printed as a short message with its fix and exits
with status 2, without a traceback; secrets are scrubbed from it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from tpo_data import cli_store
from tpo_data.errors import TPODataError


def setup_logging() -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.INFO, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(show_path=False)])


def run_main(main: Callable[[], object]) -> None:
    """Run a script's main(); user errors become a message and exit status 2."""
    try:
        main()
    except TPODataError as err:
        from tpo_data.secrets import scrub

        print(f"error: {scrub(str(err))}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tpo-data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="Run the TPO data pipeline (same as pipelines/tpo.py).",
                         add_help=False)
    gen.set_defaults(func=_run_tpo)
    for module in _COMMAND_MODULES:
        module.add_cli(sub)
    args, rest = parser.parse_known_args(argv)
    setup_logging()
    run_main(lambda: args.func(rest) if args.command == "generate" else args.func(args))


def _run_tpo(rest: list[str]) -> None:
    from tpo_data.iteration import main as tpo_main

    tpo_main(rest)


_COMMAND_MODULES: list = [cli_store]

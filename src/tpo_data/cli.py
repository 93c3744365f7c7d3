"""``tpo-data`` command line and the error handling shared by the scripts.

A :class:`TPODataError` is printed as a short message with its fix and exits
with status 2, without a traceback; secrets are scrubbed from it, and from the
traceback of any other error (:func:`guarded`).
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tpo_data import cli_argilla, cli_pit, cli_store, cli_train
from tpo_data.errors import TPODataError


def recipe_parser(dataclass_types: Any, prog: str | None = None) -> Any:
    """TRL's ``TrlParser`` over ``dataclass_types``; its help also names ``--config``, which
    TrlParser reads before argparse and so never lists."""
    from trl import TrlParser

    # No abbreviations: "--num_sample 4" must not quietly set --num_samples on a resumable run.
    parser = TrlParser(dataclass_types, prog=prog, allow_abbrev=False, epilog=(
        "--config RECIPE.yaml takes defaults from a YAML recipe (see recipes/); flags given on "
        "the command line override it."))
    for action in parser._actions:
        # HfArgumentParser gives the --no_X switch of a True-by-default flag X's own help.
        if isinstance(action, argparse._StoreFalseAction) and action.option_strings[0].startswith("--no_"):
            action.help = f"Same as --{action.dest} false."
            action.default = argparse.SUPPRESS  # not listed as "(default: False)"; X's default stands
    return parser


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option with its default, unless it is required or its help says what the default means."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class RawHelpFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """:class:`HelpFormatter` with the description as written (a docstring with usage examples)."""


class CommandParser(argparse.ArgumentParser):
    """The parser of ``tpo-data`` and its subcommands (which inherit the class).

    ``--max-items`` also answers to ``--max_items``, as TRL's parser does for the recipe
    commands, so one spelling works everywhere; and no abbreviations, as in
    :func:`recipe_parser`, because several of these commands resume from files.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *names: str, **kwargs: Any) -> argparse.Action:  # type: ignore[override]
        aliases = ["--" + n[2:].replace("-", "_") for n in names if n.startswith("--") and "-" in n[2:]]
        return super().add_argument(*names, *[a for a in aliases if a not in names], **kwargs)


def read_recipe(path: str | Path, given_as: str = "--config") -> dict[str, Any]:
    """A YAML recipe as a mapping, or an error that says what is wrong with it."""
    import yaml

    if not Path(path).is_file():
        raise TPODataError(f"The recipe {str(path)!r} ({given_as}) is not a file.",
                           "Pass a YAML recipe file (the ones in recipes/ are examples).")
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as err:  # e.g. no permission
        raise TPODataError(f"Cannot read the recipe {path}: {err.strerror}.",
                           "Pass a YAML recipe file you can read (the ones in recipes/ are examples).") from None
    except yaml.YAMLError as err:
        raise TPODataError(f"The recipe {path} is not valid YAML: {err}",
                           "Fix the YAML: a mapping of option names to values, as in recipes/.") from None
    if not isinstance(data, dict):
        raise TPODataError(f"The recipe {path} is not a mapping of option names to values.",
                           "Write it as `option: value` lines, as in recipes/.")
    return data


def split_recipe(args: Sequence[str]) -> tuple[str | None, list[str]]:
    """The ``--config`` path (also given as ``--config=PATH``) and the other arguments."""
    args = [part for arg in args for part in (arg.split("=", 1) if arg.startswith("--config=") else [arg])]
    if args.count("--config") > 1:
        raise TPODataError("--config is given more than once.", "Pass one recipe; override its values with flags.")
    if "--config" not in args:
        return None, args
    at = args.index("--config")
    if at + 1 == len(args):
        raise TPODataError("--config is given without a file.", "Pass --config RECIPE.yaml (see recipes/).")
    return args[at + 1], args[:at] + args[at + 2:]


def parse_checked(parser: Any, parse: Callable[[], tuple]) -> tuple:
    """``parse()``, whose last item is the command line's unknown flags, with those flags and
    the dataclasses' invalid values as :class:`TPODataError`; returns the items before it."""
    try:
        *parsed, unknown = parse()
    except ValueError as err:  # the dataclasses' own checks (e.g. DPOConfig's)
        raise TPODataError(f"Invalid option values: {err}",
                           "Change the flags or recipe keys named above.") from None
    if unknown:
        raise TPODataError(f"Unknown option(s): {' '.join(unknown)}.",
                           f"`{parser.prog} --help` lists the options (full names only).")
    return tuple(parsed)


def parse_recipe(parser: Any, argv: list[str] | None, also_reads: tuple[type, ...] = ()) -> tuple:
    """``parser.parse_args_and_config`` with user errors as :class:`TPODataError`.

    A missing or malformed recipe, an unknown flag, or a recipe key that no option reads
    gets a message naming it. Keys of ``also_reads`` (dataclasses of sibling commands that
    share the recipe, e.g. the loop's for ``eval``) are ignored.
    """
    import dataclasses

    recipe, args = split_recipe(sys.argv[1:] if argv is None else argv)
    if recipe is not None:
        read_recipe(recipe)  # its errors, before TrlParser reads it
        args = ["--config", recipe, *args]  # TrlParser finds only "--config PATH"
    *parsed, from_recipe = parse_checked(parser, lambda: parser.parse_args_and_config(
        args, return_remaining_strings=True, separate_remaining_strings=True))
    shared = {f.name for kind in also_reads for f in dataclasses.fields(kind)}
    unknown = [key[2:] for key in from_recipe[::2] if key[2:] not in shared]
    if unknown:
        raise TPODataError(f"The recipe {recipe} has key(s) that no option of {parser.prog} reads: "
                           f"{', '.join(unknown)}.",
                           f"Fix their spelling (`{parser.prog} --help` lists the options) or remove them.")
    return tuple(parsed)


def setup_logging(level: int = logging.INFO) -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    from tpo_data.secrets import scrub_log_records

    scrub_log_records()  # tokens and API keys never reach a log
    # stderr, so stdout stays clean for --json output and pipes.
    handler = RichHandler(show_path=False, console=Console(stderr=True))
    logging.basicConfig(level=level, format="%(message)s", datefmt="[%X]", handlers=[handler])
    # The OpenAI client's HTTP library logs every request at INFO (hundreds per evaluation,
    # drowning the progress lines). distilabel's step workers: steps._silence_httpx2.
    # matplotlib notes at INFO how it reads the report's axis labels ("Using categorical units").
    for name in ("httpx", "httpx2", "matplotlib"):
        logging.getLogger(name).setLevel(max(level, logging.WARNING))


def report(err: TPODataError) -> int:
    """Print a user error (scrubbed) and return the exit status for it."""
    from tpo_data.secrets import scrub

    print(f"error: {scrub(str(err))}", file=sys.stderr)
    return 2


def guarded(func: Callable[[], object]) -> int:
    """Run ``func``: a user error becomes its message (status 2), Ctrl-C a note (130), and any
    other exception a traceback without local variables, scrubbed of secrets (status 1).

    Why not let Python print it: an exception's message may quote a token, and a script that
    imported distilabel itself has rich's ``show_locals=True`` hook, which prints every frame's
    variables (``tpo_data.distilabel_hooks`` keeps it out when we import distilabel first).
    """
    from tpo_data.secrets import scrub

    try:
        status = func()
    except TPODataError as err:
        return report(err)
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume (finished work is kept)", file=sys.stderr)
        return 130
    except Exception:
        print(scrub(traceback.format_exc()), file=sys.stderr, end="")
        return 1
    return status if isinstance(status, int) else 0


def run_main(main: Callable[[], object]) -> None:
    """Run a script's main() under :func:`guarded`; exit with its status."""
    sys.exit(guarded(main))


def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(
        prog="tpo-data",
        description="Thought Preference Optimization (TPO) and implicit self-improvement (PIT): "
        "build preference datasets with distilabel, version them, review them in Argilla and "
        "train on them with TRL. `tpo-data COMMAND --help` lists a command's options.",
        epilog="Main job: tpo-data iterate --config recipes/tpo-smollm2.yaml --iterations 2",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    sub = parser.add_subparsers(dest="command", required=True)
    # These take a recipe (--config) plus TRL-style overrides; TrlParser reads them, --help included.
    for name, (func, text) in _RECIPE_COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False).set_defaults(func=func)
    for module in _COMMAND_MODULES:
        module.add_cli(sub)
    args, rest = parser.parse_known_args(argv)
    recipe_command = args.command in _RECIPE_COMMANDS
    if rest and not recipe_command:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    setup_logging(logging.WARNING if args.quiet else logging.INFO)
    return guarded(lambda: args.func(rest) if recipe_command else args.func(args))


def _run_tpo(rest: list[str]) -> None:
    from tpo_data.iteration import main as tpo_main

    tpo_main(rest, prog="tpo-data generate")


def _run_loop(rest: list[str]) -> None:
    from tpo_data.loop import main as loop_main

    loop_main(rest, prog="tpo-data iterate")


def _run_eval(rest: list[str]) -> None:
    from tpo_data.loop import eval_main

    eval_main(rest, prog="tpo-data eval")


_RECIPE_COMMANDS: dict[str, tuple[Callable[[list[str]], None], str]] = {
    "generate": (_run_tpo, "Run the TPO data pipeline for one iteration (same as pipelines/tpo.py)."),
    "iterate": (_run_loop, "Run the TPO loop: generate, judge, store, train, repeat; then evaluate."),
    "eval": (_run_eval, "Held-out evaluation: win rates vs M0 and the direct baseline, parse rate."),
}


_COMMAND_MODULES: list = [cli_store, cli_pit, cli_argilla, cli_train]

if __name__ == "__main__":
    sys.exit(main())

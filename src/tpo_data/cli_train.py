"""``tpo-data train``: DPO on a dataset version, the same as ``python trainers/dpo.py``.

Every argument after ``train`` goes to :func:`tpo_data.training.main` untouched
(TRL's parser owns them, ``--config`` and ``--help`` included), so this
subcommand's own parser accepts no options of its own.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_cli(subparsers: Any) -> None:
    """Register ``train`` on an argparse subparsers object."""
    # prefix_chars="+": argparse must not read "--config" etc. as options of this parser.
    train = subparsers.add_parser(
        "train",
        help="Train a model with DPO on a dataset version (same as trainers/dpo.py; --help for options).",
        add_help=False,
        prefix_chars="+",
    )
    train.add_argument("train_args", nargs=argparse.REMAINDER)
    train.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from tpo_data.training import main

    main(args.train_args, prog="tpo-data train")
    return 0

"""``tpo-data argilla push | pull | apply``: human review of a version in Argilla.

:func:`add_cli` registers the ``argilla`` command on the ``tpo-data`` argparse
parser; each subcommand sets ``func`` to a handler taking the parsed arguments
and returning an exit code (``tpo-data argilla ...``, or ``python -m tpo_data.cli
argilla ...``). The server and key come only from ARGILLA_API_URL and
ARGILLA_API_KEY (never an argument: it would land in shell history and process
lists). ``pull`` writes ``<store>/reviews/<version>.json``, which ``apply`` reads.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tpo_data.errors import TPODataError
from tpo_data.files import write_text_atomic
from tpo_data.secrets import scrub

_STORE_HELP = "the local store folder that holds the version (<output_dir>/store, for example outputs/tpo-smollm2/store)"
_NAME_HELP = ("Argilla dataset name (default: tpo-<run folder>-<version>-<digest of the version's "
              "manifest>, one name per version)")
_WORKSPACE_HELP = "Argilla workspace (default: the dataset's, or the first workspace when creating it)"


def reviews_path(store_root: str | Path, version: str) -> Path:
    """Where ``pull`` writes and ``apply`` reads the reviews of ``version``."""
    return Path(store_root) / "reviews" / f"{version}.json"


def add_cli(subparsers: Any) -> None:
    """Register ``argilla push|pull|apply`` on an argparse subparsers object."""
    argilla = subparsers.add_parser(
        "argilla",
        help="Review pairs in Argilla: push, pull, apply.",
        description="Human review of a version's pairs in Argilla. The server comes from ARGILLA_API_URL and "
        "ARGILLA_API_KEY (local server: bash scripts/argilla-server.sh start; "
        'eval "$(bash scripts/argilla-server.sh env)").',
    )
    commands = argilla.add_subparsers(dest="argilla_command", required=True)

    push = commands.add_parser(
        "push",
        help="Create or update the review dataset of a version.",
        description="Log the version's pairs as Argilla records (id = instruction_id, so pushing again updates "
        "records and keeps answers). The judge's choice is pre-filled as a suggestion.",
    )
    _common(push)
    push.add_argument("--sample", type=int, help="push only the first N pairs of --order")
    push.add_argument(
        "--order",
        choices=("smallest_gap", "random", "as_is"),
        default="smallest_gap",
        help="record order: smallest |score_gap| first (default; the judge's least sure calls), random, as_is",
    )
    push.add_argument("--seed", type=int, default=0, help="seed of --order random (default: 0)")
    push.set_defaults(func=_cmd_push)

    pull = commands.add_parser(
        "pull",
        help="Download submitted answers to <store>/reviews/<version>.json.",
        description="Collect the submitted answers per pair (label, flags, note, reviewer). Records deleted in "
        "Argilla count as missing; their pairs stay as they are.",
    )
    _common(pull)
    pull.set_defaults(func=_cmd_pull)

    apply = commands.add_parser(
        "apply",
        help="Write the curated version from the pulled reviews.",
        description="Write a new version: 'no' flips (or drops) the pair, 'tie' and any flag drop it, "
        "unreviewed pairs are kept. Multiple reviewers: majority label, a split vote counts as tie.",
    )
    apply.add_argument("version", help="the reviewed version, for example iter-1")
    apply.add_argument("--store", metavar="PATH", required=True, help=_STORE_HELP)
    apply.add_argument("--on-no", choices=("flip", "drop"), default="flip",
                       help="what a 'no' does: flip chosen and rejected (default) or drop the pair")
    apply.add_argument("--new-version",
                       help="name of the curated version (default: <version>-curated)")
    apply.add_argument("--reviews", metavar="PATH", help="reviews JSON (default: <store>/reviews/<version>.json)")
    apply.set_defaults(func=_cmd_apply)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("version", help="store version, for example iter-1")
    parser.add_argument("--store", metavar="PATH", required=True, help=_STORE_HELP)
    parser.add_argument("--dataset-name", help=_NAME_HELP)
    parser.add_argument("--workspace", help=_WORKSPACE_HELP)


def _cmd_push(args: argparse.Namespace) -> int:
    from tpo_data.curation import connect, push_for_review
    from tpo_data.store import LocalStore

    store = LocalStore(args.store)
    store.path(args.version)  # a missing version fails before any network call
    client = connect()
    dataset = push_for_review(
        store,
        args.version,
        client,
        workspace=args.workspace,
        dataset_name=args.dataset_name,
        sample=args.sample,
        order=args.order,
        seed=args.seed,
    )
    print(f"pushed {args.version} to Argilla dataset {dataset.name!r} (workspace {dataset.workspace.name!r})")
    print(f"review it at {client.api_url}, then run: tpo-data argilla pull {args.version} "
          f"--store {args.store}")
    return 0


def _cmd_pull(args: argparse.Namespace) -> int:
    from tpo_data.curation import connect, pull_reviews
    from tpo_data.store import LocalStore

    store = LocalStore(args.store)
    store.path(args.version)
    reviews = pull_reviews(store, args.version, connect(), args.dataset_name, workspace=args.workspace)
    out = reviews_path(args.store, args.version)
    out.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "version": args.version,
        # The exact version reviewed: a file left from before the version was regenerated, or
        # from another store, holds answers about other pairs under the same ids.
        "manifest_sha256": store.manifest_sha256(args.version),
        "dataset": reviews.dataset,
        "pulled_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "counts": reviews.counts,
        "missing_ids": reviews.missing_ids,
        "reviews": list(reviews),
    }
    # Atomic: a crash mid-write keeps the reviews pulled before.
    write_text_atomic(out, scrub(json.dumps(document, indent=2, sort_keys=True)) + "\n")
    c = reviews.counts
    print(f"{c['reviewed']} reviewed, {c['not_reviewed']} not reviewed, {c['missing']} missing from Argilla "
          f"(of {c['pairs']} pairs); wrote {out}")
    return 0


def _cmd_apply(args: argparse.Namespace) -> int:
    from tpo_data.curation import apply_reviews
    from tpo_data.store import LocalStore

    path = Path(args.reviews) if args.reviews else reviews_path(args.store, args.version)
    if not path.is_file():
        raise TPODataError(
            f"no reviews file at {path}",
            f"pull the answers first: tpo-data argilla pull {args.version} --store {args.store}",
        )
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        reviews = document["reviews"]
    except (ValueError, KeyError, TypeError) as err:
        raise TPODataError(f"{path} is not a reviews file ({err})", "pull the answers again") from None
    if document.get("version") not in (None, args.version):
        raise TPODataError(
            f"{path} holds reviews of version {document['version']}, not {args.version}",
            "apply it to the version it was pulled for, or pass the right --reviews",
        )
    store = LocalStore(args.store)
    digest = store.manifest_sha256(args.version)
    if document.get("manifest_sha256", digest) != digest:
        raise TPODataError(
            f"{path} holds reviews of another {args.version} than the one in {store.root} (manifest "
            f"sha256 {str(document['manifest_sha256'])[:12]} there, {digest[:12]} here): it was pulled "
            "before the version was written again, or from another store",
            f"pull the answers of this version: tpo-data argilla pull {args.version} --store {args.store}",
        )
    new = apply_reviews(
        store, args.version, reviews, on_no=args.on_no, new_version=args.new_version, source=str(path)
    )
    c = store.manifest(new)["curation"]
    agreement = "n/a" if c["agreement"] is None else f"{c['agreement']:.1%}"
    dropped = c["dropped_no"] + c["dropped_tie"] + c["dropped_flagged"]
    print(f"wrote version {new}: {c['pairs_out']} of {c['pairs_in']} pairs; reviewed {c['reviewed']}, "
          f"agreement {agreement}, flipped {c['flipped_no']}, dropped {dropped}")
    return 0

"""``tpo-data versions | show | publish``: inspect and publish dataset versions.

:func:`add_cli` registers the three subcommands on the ``tpo-data`` argparse
parser; each sets ``func`` to a handler taking the parsed arguments and returning
an exit code (``tpo-data versions ...``, or ``python -m tpo_data.cli versions ...``).
The token is never a command-line argument (it would land in shell history and
process lists): it comes from HF_TOKEN or ``hf auth login``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tpo_data.errors import TPODataError
from tpo_data.secrets import scrub

_SOURCE_HELP = (
    "read local versions from this store folder (<output_dir>/store, for example outputs/tpo-smollm2/store)"
)
_REPO_HELP = (
    "read published versions from this Hub dataset repo (user/name) instead of a local store"
)


def _add_source(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--store", metavar="PATH", help=_SOURCE_HELP)
    source.add_argument("--repo", metavar="ID", help=_REPO_HELP)
    parser.add_argument(
        "--json", action="store_true", help="print JSON instead of tables (for scripts)"
    )


def add_cli(subparsers: Any) -> None:
    """Register ``versions``, ``show`` and ``publish`` on an argparse subparsers object."""
    versions = subparsers.add_parser(
        "versions",
        help="List dataset versions with their lineage.",
        description="List the versions of a local store (--store) or the tagged versions of a "
        "Hub dataset repo "
        "(--repo): iteration, row counts, parent model, creation time and manifest sha256.",
    )
    _add_source(versions)
    versions.set_defaults(func=_cmd_versions)

    show = subparsers.add_parser(
        "show",
        help="Print the lineage and statistics of one version.",
        description="Print the lineage, row counts and statistics in a version's manifest.",
    )
    show.add_argument(
        "version", help="version name, for example iter-2 (on the Hub: a tag, branch or commit)"
    )
    _add_source(show)
    show.set_defaults(func=_cmd_show)

    publish = subparsers.add_parser(
        "publish",
        help="Publish a local version to the Hub and tag it.",
        description="Upload a local version (both configs, card, plots, manifest, "
        "pipeline.yaml) to a Hub dataset repo in one commit and tag that commit (default tag: "
        "the version name). An existing tag is refused; "
        "transient errors are retried. The token comes from HF_TOKEN or `hf auth login`.",
    )
    publish.add_argument("version", help="local version to publish, for example iter-2")
    publish.add_argument("--store", metavar="PATH", required=True, help=_SOURCE_HELP)
    publish.add_argument(
        "--repo",
        metavar="ID",
        required=True,
        help="Hub dataset repo (user/name), created if missing",
    )
    publish.add_argument(
        "--tag", help="tag name on the Hub (default: the version name); use a new one to republish"
    )
    publish.add_argument(
        "--private", action="store_true", help="create the repo as private if it does not exist"
    )
    publish.add_argument(
        "--max-retries", type=int, default=5, help="retries for transient errors (default: 5)"
    )
    publish.set_defaults(func=_cmd_publish)


def _source(args: argparse.Namespace) -> None:
    if not (args.store or args.repo):
        raise TPODataError(
            "no source given",
            "pass --store <output_dir>/store for local versions or --repo user/name",
        )


def _short(sha: str | None) -> str:
    return (sha or "")[:8]


def _cell(value: Any) -> str:
    """Table cell text: empty for None, JSON for structures, scrubbed always."""
    if value is None:
        return ""
    return scrub(
        value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    )


def _rows(manifest: dict[str, Any]) -> str:
    return ", ".join(
        f"{name} {count}" for name, count in sorted((manifest.get("row_counts") or {}).items())
    )


def _print_json(data: Any) -> None:
    print(scrub(json.dumps(data, indent=2, sort_keys=True, default=str)))


def _cmd_versions(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    _source(args)
    if args.repo:
        from tpo_data.hub import hub_versions

        found = hub_versions(args.repo)
        title = f"Versions in {args.repo}"
    else:
        from tpo_data.store import LocalStore

        if not Path(args.store).is_dir():  # a mistyped path, not an empty store
            raise TPODataError(f"There is no store at {args.store} (no such folder).",
                               "Check --store: the main job writes outputs/tpo-smollm2/store, "
                               "scripts/pit.sh outputs/pit-smollm2/store.")
        found = LocalStore(args.store).versions()
        title = f"Versions in {args.store}"
    if args.json:
        _print_json(found)
        return 0
    table = Table(title=title)
    show_parent_version = any(m.get("parent_version") for m in found)
    columns = ["version", "iter", "pairs", "candidates", "parent model"]
    columns += (
        ["parent version"] * show_parent_version
        + ["created (UTC)", "manifest"]
        + ["commit"] * bool(args.repo)
    )
    for column in columns:
        # Short identifiers stay on one line; free text folds.
        short = column in ("version", "iter", "pairs", "manifest", "commit")
        table.add_column(column, overflow="fold", no_wrap=short)
    for manifest in found:
        counts = manifest.get("row_counts") or {}
        row = [
            manifest.get("tag") or manifest.get("version", ""),
            _cell(manifest.get("iteration")),
            _cell(counts.get("pairs")),
            _cell(counts.get("candidates")),
            _cell(manifest.get("parent_model")),
            *([_cell(manifest.get("parent_version"))] * show_parent_version),
            _cell(manifest.get("created"))[:16].replace("T", " "),
            _short(manifest.get("manifest_sha256")),
            *([_short(manifest.get("commit"))] * bool(args.repo)),
        ]
        table.add_row(*row)
    Console().print(table if found else f"{title}: none")
    if not args.repo:
        from tpo_data.loop import format_lineage, read_lineage

        # A loop's store sits in its output folder, beside the loop's lineage.
        lineage = read_lineage(Path(args.store).parent)
        if lineage:
            Console().print("Lineage (tpo-data iterate):\n" + format_lineage(lineage), highlight=False)
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    _source(args)
    if args.repo:
        from tpo_data.hub import hub_manifest

        manifest = hub_manifest(args.repo, args.version)
    else:
        from tpo_data.store import LocalStore

        store = LocalStore(args.store)
        manifest = store.manifest(args.version)
        manifest["manifest_sha256"] = store.manifest_sha256(args.version)
    if args.json:
        _print_json(manifest)
        return 0
    console = Console()
    lineage = Table(title=f"{manifest.get('version', args.version)}: lineage", show_header=False)
    lineage.add_column("field")
    lineage.add_column("value", overflow="fold")
    for key in (
        "version",
        "iteration",
        "parent_model",
        "parent_version",
        "seed",
        "instruction_slice",
        "created",
        "manifest_sha256",
    ):
        lineage.add_row(key, _cell(manifest.get(key)))
    lineage.add_row("rows", _rows(manifest))
    console.print(lineage)
    stats = Table(title="statistics", show_header=False)
    stats.add_column("statistic")
    stats.add_column("value", overflow="fold")
    for key, value in (manifest.get("stats") or {}).items():
        stats.add_row(key, _cell(value))
    console.print(stats)
    return 0


def _cmd_publish(args: argparse.Namespace) -> int:
    from tpo_data.hub import publish_version
    from tpo_data.store import LocalStore

    tag = args.tag or args.version
    commit = publish_version(
        LocalStore(args.store),
        args.version,
        args.repo,
        private=args.private,
        tag=tag,
        max_retries=args.max_retries,
    )
    print(f"published {args.version} to {args.repo}: commit {commit}, tag {tag}")
    print(f'load it with: load_dataset("{args.repo}", "pairs", revision="{tag}", split="train")')
    return 0

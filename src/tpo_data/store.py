"""Local, immutable, versioned store of iteration datasets.

Each version is a folder laid out like a Hugging Face dataset repository::

    <root>/<version>/
        README.md                                   card; its YAML declares the configs
        data/<config>/train-00000-of-00001.parquet  one parquet shard per config
        manifest.json                               lineage, row counts, sha256 of every file
        plots/*.png, pipeline.yaml                  extra files

so ``datasets.load_dataset("<root>/<version>", "pairs")`` reads it directly and
:mod:`tpo_data.hub` can publish the exact bytes. One folder per version, because
``load_dataset`` on a local git repository ignores ``revision``.

A version is built in a hidden ``<root>/.tmp-<uuid>`` folder, fsynced, and then
renamed into place, so a crash never leaves a half-written visible version, and
an existing version is never overwritten. A ``.tmp-*`` folder left by a crash is
never listed as a version and is removed by the next write once nothing in it has
changed for :data:`STALE_TMP_AGE_S` (younger ones may belong to a concurrent writer).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Mapping
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from tpo_data.errors import TPODataError
from tpo_data.files import sha256_file
from tpo_data.secrets import scrub

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"
# A write takes seconds to minutes; a .tmp folder unchanged for an hour has lost its writer.
# (A writer that was only paused finds its files gone and fails: see write_version.)
STALE_TMP_AGE_S = 3600.0
CARD = "README.md"
PIPELINE = "pipeline.yaml"
# Valid as a folder name and as a git tag, so a local version can be published under its own name.
_VERSION_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
_CONFIG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_TEXT_SUFFIXES = {".yaml", ".yml", ".json", ".md", ".txt", ".toml", ".cfg"}
_LIBRARIES = (
    "tpo-data",
    "datasets",
    "huggingface-hub",
    "pyarrow",
    "distilabel",
    "transformers",
    "trl",
    "torch",
)
_RESERVED = {CARD, MANIFEST}
# Folders of the store that are not versions: `tpo-data argilla pull` writes reviews/<version>.json.
_NOT_VERSIONS = {"reviews"}


def _is_version_name(version: str) -> bool:
    # git refuses ref names ending in ".lock", so such a version could not be tagged.
    return (bool(_VERSION_RE.match(version)) and ".." not in version and not version.endswith(".lock")
            and version not in _NOT_VERSIONS)


def check_version_name(version: str) -> None:
    """Refuse names that are not safe both as a folder and as a git tag."""
    if not _is_version_name(version):
        raise TPODataError(
            f"invalid version name {version!r}",
            "use letters, digits, '.', '_' and '-' only, "
            "starting and ending with a letter or digit, not ending in '.lock', not 'reviews' "
            "(the store's reviews folder; for example iter-3 or iter-3-rerun)",
        )


def library_versions() -> dict[str, str]:
    """Versions of Python and of the libraries that shape the data, for the manifest."""
    found = {"python": sys.version.split()[0]}
    for name in _LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def _hash_tree(folder: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under ``folder`` except the manifest, keyed by posix path."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel != MANIFEST:
            files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return files


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    # Files first, then their directories, so the rename publishes durable content.
    for path in folder.rglob("*"):
        if path.is_file():
            _fsync_path(path)
    for path in sorted(
        (p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
    ):
        _fsync_path(path)
    _fsync_path(folder)


def _safe_relative(rel: str) -> str:
    posix = PurePosixPath(rel)
    if (
        posix.is_absolute()
        or ".." in posix.parts
        or not posix.parts
        # Normalised, so "./README.md" or "README.md/" cannot replace the card either.
        or posix.as_posix() in _RESERVED
        or posix.parts[0] == "data"
    ):
        raise TPODataError(
            f"extra file path {rel!r} is not allowed in a version folder",
            "use a relative path without '..', outside data/, "
            f"other than {', '.join(sorted(_RESERVED))}",
        )
    return posix.as_posix()


class LocalStore:
    """A folder of immutable dataset versions (one subfolder per version)."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)

    def _names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        # Hidden folders (.tmp-*) are unfinished writes and never versions.
        return sorted(
            p.name
            for p in self.root.iterdir()
            if _is_version_name(p.name) and (p / MANIFEST).is_file()
        )

    def remove_stale_tmp(self, max_age_s: float = STALE_TMP_AGE_S) -> list[str]:
        """Delete ``.tmp-*`` folders (crashed writes) unchanged for ``max_age_s``; return names.

        Age is that of the newest entry inside, so a folder a concurrent writer is still
        filling is kept.
        """
        if not self.root.is_dir():
            return []
        removed = []
        cutoff = time.time() - max_age_s
        for tmp in self.root.glob(f"{TMP_PREFIX}*"):
            if tmp.is_symlink() or not tmp.is_dir():
                continue
            try:
                newest = max([tmp.lstat().st_mtime, *(p.lstat().st_mtime for p in tmp.rglob("*"))])
            except OSError:  # removed meanwhile by another writer
                continue
            if newest < cutoff:
                shutil.rmtree(tmp, ignore_errors=True)
                removed.append(tmp.name)
        if removed:
            logger.info(
                "removed %d stale unfinished write(s) from %s: %s",
                len(removed),
                self.root,
                ", ".join(sorted(removed)),
            )
        return removed

    def check_new(self, version: str, flag: str | None = None) -> None:
        """Raise unless ``version`` is a valid name that does not exist yet.

        ``flag`` is the option that named the version, for the fix the error gives.
        """
        check_version_name(version)
        if (self.root / version).exists():
            rename = (f"pass another {flag} (for example {version}-rerun)" if flag
                      else "write it under another version name or to another store")
            raise TPODataError(
                f"version {version} already exists in store {self.root}; versions are immutable",
                f"{rename}, or delete {self.root / version} yourself if it is garbage",
            )

    def write_version(
        self,
        version: str,
        configs: Mapping[str, datasets.Dataset],
        manifest: Mapping[str, Any],
        card: str,
        extra_files: Mapping[str, bytes] | None = None,
        *,
        flag: str | None = None,
    ) -> Path:
        """Write a new version atomically and return its folder.

        ``manifest`` is completed with the version name, row counts, creation time
        and library versions where missing, and always with the sha256 and size of
        every file. Text is scrubbed of secrets before it touches the disk. ``flag``:
        as in :meth:`check_new`.
        """
        self.check_new(version, flag)
        for name in configs:
            if not _CONFIG_RE.match(name):
                raise TPODataError(
                    f"invalid config name {name!r}", "use letters, digits, '_' and '-' only"
                )
        extras = {_safe_relative(rel): data for rel, data in (extra_files or {}).items()}
        self.root.mkdir(parents=True, exist_ok=True)
        self.remove_stale_tmp()
        tmp = self.root / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            from tpo_data.card import data_file_path

            for name, ds in configs.items():
                target = tmp / data_file_path(name)
                target.parent.mkdir(parents=True, exist_ok=True)
                ds.to_parquet(str(target))
            _write_bytes(tmp / CARD, scrub(card).encode())
            for rel, data in extras.items():
                if PurePosixPath(rel).suffix in _TEXT_SUFFIXES:
                    data = scrub(data.decode("utf-8")).encode("utf-8")
                _write_bytes(tmp / rel, data)
            full = dict(manifest)
            full["version"] = version
            full.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
            full.setdefault("row_counts", {name: ds.num_rows for name, ds in configs.items()})
            full.setdefault("library_versions", library_versions())
            full["files"] = _hash_tree(tmp)
            written = {data_file_path(name) for name in configs} | {CARD} | set(extras)
            lost = sorted(written - full["files"].keys())
            if lost:
                # Another writer removed this folder as stale while this one was paused.
                raise TPODataError(
                    f"writing version {version} lost {', '.join(lost)}: its unfinished folder {tmp.name} "
                    f"was removed as stale (no change for {STALE_TMP_AGE_S:.0f} s) while this writer was paused",
                    "run the same command again; nothing was published",
                )
            _write_bytes(
                tmp / MANIFEST,
                scrub(json.dumps(full, indent=2, sort_keys=True, default=str)).encode(),
            )
            _fsync_tree(tmp)
            # A concurrent writer may have won while this one was building.
            self.check_new(version, flag)
            try:
                os.rename(tmp, self.root / version)
            except OSError:
                # ... or between that check and the rename (ENOTEMPTY/EEXIST).
                self.check_new(version, flag)
                raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_path(self.root)
        return self.root / version

    def versions(self) -> list[dict[str, Any]]:
        """Manifests of all versions by iteration then name, each with ``manifest_sha256``."""
        found = []
        for name in self._names():
            manifest = self.manifest(name)
            manifest["manifest_sha256"] = self.manifest_sha256(name)
            found.append(manifest)
        return sorted(
            found, key=lambda m: (m.get("iteration") is None, m.get("iteration") or 0, m["version"])
        )

    def manifest(self, version: str) -> dict[str, Any]:
        """The manifest of ``version``."""
        return json.loads((self.path(version) / MANIFEST).read_text(encoding="utf-8"))

    def manifest_sha256(self, version: str) -> str:
        """The sha256 of ``version``'s manifest, which covers every file's hash: it names the
        exact data, wherever the store lives (lineage, reviews and model reuse match on it)."""
        return sha256_file(self.path(version) / MANIFEST)

    def path(self, version: str) -> Path:
        """The folder of ``version``; raises listing the existing versions if it is missing."""
        folder = self.root / version
        # Only plain names: no hidden .tmp folders, no paths into or out of the store.
        if not _is_version_name(version) or not (folder / MANIFEST).is_file():
            existing = ", ".join(self._names()) or "none"
            raise TPODataError(
                f"version {version!r} not found in store {self.root} "
                f"(existing versions: {existing})",
                "pass one of the existing versions, or check the store path "
                f"(`tpo-data versions --store {self.root}`)",
            )
        return folder

    def load(
        self, version: str, config: str = "pairs", *, cache_dir: str | None = None
    ) -> datasets.Dataset:
        """Load one config of a version through ``datasets.load_dataset`` on its folder."""
        folder = self.path(version)
        row_counts = self.manifest(version).get("row_counts", {})
        configs = sorted(row_counts)
        if config not in configs:
            raise TPODataError(
                f"version {version} has no config {config!r}",
                f"use one of: {', '.join(configs) or 'none'}",
            )
        import datasets

        if row_counts[config] == 0:
            # datasets cannot build a split with no rows ('Instruction "train" corresponds to
            # no data!'); the parquet file still holds the schema.
            import pyarrow.parquet as pq

            from tpo_data.card import data_file_path

            return datasets.Dataset(pq.read_table(folder / data_file_path(config)))
        if cache_dir is None:
            # datasets keys its cache of a local folder by the folder's name, so two
            # stores holding an "iter-1" would share rows. Key it by this manifest.
            digest = self.manifest_sha256(version)[:16]
            # A shared store may be mounted read-only: then datasets' own cache holds it.
            base = self.root if os.access(self.root, os.W_OK) else Path(datasets.config.HF_DATASETS_CACHE) / "tpo-data"
            cache_dir = str(base / ".datasets-cache" / digest)
        return datasets.load_dataset(str(folder), config, split="train", cache_dir=cache_dir)

    def verify(self, version: str) -> None:
        """Re-hash every file of ``version``; raise if anything differs from the manifest."""
        folder = self.path(version)
        expected = self.manifest(version).get("files", {})
        actual = _hash_tree(folder)
        problems = [f"missing {rel}" for rel in sorted(expected.keys() - actual.keys())]
        problems += [f"unexpected {rel}" for rel in sorted(actual.keys() - expected.keys())]
        problems += [
            f"changed {rel}"
            for rel in sorted(expected.keys() & actual.keys())
            if expected[rel]["sha256"] != actual[rel]["sha256"]
        ]
        if problems:
            raise TPODataError(
                f"version {version} in {self.root} does not match its manifest: "
                + "; ".join(problems),
                "versions are immutable; restore the folder (for example from its Hub tag) "
                "or write the data again under a new version name",
            )


def write_iteration(
    store: LocalStore,
    version: str,
    *,
    pairs: datasets.Dataset,
    candidates: datasets.Dataset,
    iteration: int,
    parent_model: str,
    recipe: Mapping[str, Any],
    seed: int | None,
    instruction_slice: Any,
    pipeline_yaml: str | None = None,
    parent_version: str | None = None,
    title: str | None = None,
) -> Path:
    """Write one TPO iteration (pairs + candidates, card, plots, pipeline.yaml) as a new version."""
    from tpo_data import card

    store.check_new(version)
    stats = card.compute_stats(candidates, pairs)
    manifest: dict[str, Any] = {
        "version": version,
        "iteration": iteration,
        "parent_model": parent_model,
        "parent_version": parent_version,
        "recipe": dict(recipe),
        "seed": seed,
        "instruction_slice": instruction_slice,
        "stats": stats,
        "row_counts": {"pairs": pairs.num_rows, "candidates": candidates.num_rows},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "library_versions": library_versions(),
    }
    plots = card.make_plots(candidates, pairs)
    text = card.build_card(manifest, stats, recipe, pipeline_yaml, plots, title=title)
    extra = dict(plots)
    if pipeline_yaml:
        extra[PIPELINE] = pipeline_yaml.encode("utf-8")
    return store.write_version(
        version, {"pairs": pairs, "candidates": candidates}, manifest, text, extra
    )

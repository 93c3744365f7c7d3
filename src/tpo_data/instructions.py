"""Instructions: loading, validation and per-iteration slicing.

TPO trains every iteration on a fresh batch of instructions that no earlier
iteration used, and keeps a held-out set for evaluation. This module loads
instructions (the built-in set, a local file or a Hub dataset), validates them,
plans a deterministic holdout/training split, and records in a ledger which ids
each iteration used, so a resumed run gets exactly the same rows back.

``validate_instructions``, ``plan_slices`` and ``next_slice`` are pure; the
I/O lives in ``load_instructions`` and ``SliceLedger``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from tpo_data.errors import TPODataError
from tpo_data.files import write_text_atomic
from tpo_data.secrets import scrub

BUILTIN = "builtin"
UNCATEGORIZED = "uncategorized"
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# Suffixes that mark a missing --instructions value as a file path rather than a Hub id.
_FILE_SUFFIXES = {*LOCAL_FORMATS, ".txt", ".tsv", ".xlsx", ".xls", ".arrow", ".gz", ".zip",
                  ".bz2", ".xz", ".zst", ".yaml", ".yml", ".md", ".xml", ".html"}
DUPLICATE_POLICIES = ("error", "drop")
# How many offending rows an error message quotes before summarizing the rest.
_SHOWN = 5


@dataclass
class InstructionArguments:
    """Where instructions come from and how each iteration slices them."""

    instructions: str = field(
        default=BUILTIN,
        metadata={
            "help": "Instruction source: 'builtin' (320 instructions in 8 categories), a local "
            ".jsonl/.json/.parquet/.csv file, or a Hugging Face Hub dataset id."
        },
    )
    instructions_config: str | None = field(
        default=None, metadata={"help": "Config (subset) name of the Hub dataset."}
    )
    instructions_split: str = field(
        default="train", metadata={"help": "Split of the Hub dataset to read."}
    )
    instructions_column: str = field(
        default="instruction", metadata={"help": "Column holding the instruction text."}
    )
    instructions_id_column: str | None = field(
        default=None,
        metadata={"help": "Column holding a unique id per instruction. Default: 'row-<index>'."},
    )
    instructions_category_column: str | None = field(
        default=None,
        metadata={
            "help": f"Column holding the instruction category. Default: '{UNCATEGORIZED}' "
            "(the builtin set has its own categories)."
        },
    )
    instructions_revision: str | None = field(
        default=None, metadata={"help": "Git revision (branch, tag or commit) of the Hub dataset."}
    )
    instructions_per_iteration: int = field(
        default=32, metadata={"help": "Number of fresh instructions each TPO iteration uses."}
    )
    holdout_size: int = field(
        default=40,
        metadata={"help": "Instructions reserved for evaluation; never used for training."},
    )
    slice_seed: int = field(
        default=0, metadata={"help": "Seed of the deterministic holdout/training shuffle."}
    )
    on_duplicates: str = field(
        default="error",
        metadata={
            "help": "What to do with duplicate instruction texts: 'error' or 'drop' "
            "(keep the first occurrence).",
            "choices": list(DUPLICATE_POLICIES),
        },
    )


# ---------------------------------------------------------------- loading (I/O)


def load_instructions(args: InstructionArguments) -> list[dict]:
    """Load and validate instructions as rows ``{"id", "instruction", "category"}``."""
    if args.instructions == BUILTIN:
        text = resources.files("tpo_data").joinpath("data/instructions.jsonl").read_text("utf-8")
        records = _parse_json_lines(text, "the builtin instruction set")
        columns = ["id", "category", "instruction"]
        rows = _records_to_rows(records, columns, "instruction", "id", "category", BUILTIN)
    else:
        path = _local_path(args.instructions)
        if path is not None:
            records, columns = _read_local(path)
        else:
            records, columns = _read_hub(args)
        rows = _records_to_rows(
            records,
            columns,
            args.instructions_column,
            args.instructions_id_column,
            args.instructions_category_column,
            args.instructions,
        )
    return validate_instructions(rows, "instruction", args.on_duplicates)


def _local_path(source: str) -> Path | None:
    """The local file ``source`` names, or None when it should be read from the Hub."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    # A missing file must not fall through to the Hub: the user meant a path.
    looks_like_path = (
        path.suffix.lower() in _FILE_SUFFIXES
        or path.is_absolute()
        or source.startswith((".", "~"))
        or source.count("/") > 1
    )
    if looks_like_path:
        raise TPODataError(
            f"Instruction file not found: {source} (resolved to {path.resolve()}).",
            "Check the path passed to --instructions, or use --instructions builtin.",
        )
    return None


def _read_local(path: Path) -> tuple[list[dict], list[str]]:
    fmt = LOCAL_FORMATS.get(path.suffix.lower())
    if fmt is None or not path.is_file():
        raise TPODataError(
            f"Unsupported instruction file: {path} (supported: "
            f"{', '.join(sorted(LOCAL_FORMATS))} files).",
            "Convert it to JSON Lines, JSON, Parquet or CSV with one instruction per row.",
        )
    if fmt == "parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        return table.to_pylist(), table.column_names
    if fmt == "csv":
        # utf-8-sig: spreadsheet exports often start with a byte-order mark.
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            records = list(reader)
            return records, list(reader.fieldnames or [])
    text = path.read_text("utf-8")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # maybe JSON Lines under a .json name, as `datasets` also accepts
        if isinstance(data, list):
            records = data
        else:
            records = _parse_json_lines(text, str(path))
    else:
        records = _parse_json_lines(text, str(path))
    if not all(isinstance(r, dict) for r in records):
        raise TPODataError(
            f"{path} does not hold one JSON object per row.",
            'Write one object per line, e.g. {"instruction": "..."}, or a JSON list of objects.',
        )
    return records, _columns_of(records)


def _parse_json_lines(text: str, source: str) -> list[Any]:
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise TPODataError(
                f"{source}: line {number} is not valid JSON ({err.msg}).",
                "Fix that line so the file holds exactly one JSON object per line.",
            ) from None
    return records


def _columns_of(records: list[dict]) -> list[str]:
    columns: dict[str, None] = {}
    for record in records:
        columns.update(dict.fromkeys(record))
    return list(columns)


def _read_hub(args: InstructionArguments) -> tuple[list[dict], list[str]]:
    from datasets import load_dataset

    name = args.instructions
    described = name + "".join(
        f", {label}={value!r}"
        for label, value in (
            ("config", args.instructions_config),
            ("split", args.instructions_split),
            ("revision", args.instructions_revision),
        )
        if value is not None
    )
    try:
        dataset = load_dataset(
            name, args.instructions_config, split=args.instructions_split,
            revision=args.instructions_revision,
        )
    except Exception as err:  # noqa: BLE001 - any failure here has the same remedy
        raise TPODataError(
            f"Could not load the Hub dataset {described}: {type(err).__name__}: "
            f"{scrub(_first_line(err))}. The machine may be offline (HF_HUB_OFFLINE), "
            "or the dataset id, config, split or revision may be wrong.",
            "Check the id, config and split; or, on a machine with internet, export it with "
            f"datasets.load_dataset({name!r}, split={args.instructions_split!r})"
            ".to_json('instructions.jsonl') and pass --instructions instructions.jsonl "
            "(or use --instructions builtin).",
        ) from None
    return dataset.to_list(), list(dataset.column_names)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "no details"


# ---------------------------------------------------------------- validation (pure)


def _records_to_rows(
    records: list[dict],
    columns: list[str],
    column: str,
    id_column: str | None,
    category_column: str | None,
    source: str,
) -> list[dict]:
    """Map source records to rows ``{"id", "instruction", "category"}`` (values unchecked)."""
    if not records:
        raise TPODataError(
            f"The instruction source {source} has no rows.",
            "Point --instructions at a file or dataset split that contains instructions.",
        )
    for value, flag in (
        (column, "--instructions_column"),
        (id_column, "--instructions_id_column"),
        (category_column, "--instructions_category_column"),
    ):
        if value is not None and value not in columns:
            raise TPODataError(
                f"Column {value!r} not found in {source}; its columns are: "
                f"{', '.join(map(repr, columns))}.",
                f"Pass {flag} with one of those column names.",
            )
    return [
        {
            "id": f"row-{index}" if id_column is None else _id_text(record.get(id_column)),
            "instruction": record.get(column),
            "category": UNCATEGORIZED
            if category_column is None
            else str(record.get(category_column) or UNCATEGORIZED),
        }
        for index, record in enumerate(records)
    ]


def _id_text(value: Any) -> str:
    # A missing id becomes "", which validation reports as an empty id.
    return "" if value is None else str(value).strip()


def validate_instructions(rows: list[dict], column: str, on_duplicates: str) -> list[dict]:
    """Check rows and return them as ``{"id", "instruction", "category"}``.

    Each row needs an ``"id"`` and the instruction text under ``column``; a
    missing ``"category"`` becomes ``"uncategorized"``. Texts count as
    duplicates when they match ignoring case and whitespace; with
    ``on_duplicates="drop"`` the first occurrence is kept.
    """
    if on_duplicates not in DUPLICATE_POLICIES:
        raise TPODataError(
            f"Unknown --on_duplicates value {on_duplicates!r}.",
            f"Use one of: {', '.join(DUPLICATE_POLICIES)}.",
        )
    for row in rows:
        if column not in row:
            raise TPODataError(
                f"Column {column!r} not found in row {row.get('id', '?')!r}; its columns are: "
                f"{', '.join(map(repr, row))}.",
                "Pass --instructions_column with the name of the column holding the text.",
            )
    not_text = [row for row in rows if not isinstance(row[column], str)]
    if not_text:
        types = sorted({type(row[column]).__name__ for row in not_text})
        raise TPODataError(
            f"{len(not_text)} instruction(s) are not strings ({', '.join(types)}), in rows "
            f"{_row_ids(not_text)}.",
            "Fill or remove those rows, or point --instructions_column at the text column.",
        )
    blank = [row for row in rows if not row[column].strip()]
    if blank:
        raise TPODataError(
            f"{len(blank)} instruction(s) are empty or whitespace-only, in rows {_row_ids(blank)}.",
            "Fill in or remove those rows.",
        )

    kept, first_by_text, duplicates = [], {}, []
    for row in rows:
        key = " ".join(row[column].split()).casefold()
        if key in first_by_text:
            duplicates.append((row, first_by_text[key]))
        else:
            first_by_text[key] = row
            kept.append(row)
    if duplicates and on_duplicates == "error":
        shown = "; ".join(
            f"{row['id']!r} repeats {first['id']!r} ({_preview(row[column])})"
            for row, first in duplicates[:_SHOWN]
        )
        more = f" and {len(duplicates) - _SHOWN} more" if len(duplicates) > _SHOWN else ""
        raise TPODataError(
            f"{len(duplicates)} duplicate instruction(s): {shown}{more}.",
            "Remove the duplicates, or pass --on_duplicates drop to keep the first of each.",
        )

    # Ids key the ledger, so they must be unique after dropping duplicate texts.
    ids = [str(row["id"]).strip() for row in kept]
    if not all(ids):
        raise TPODataError(
            f"{ids.count('')} instruction(s) have an empty id.",
            "Fill the id column, or leave --instructions_id_column unset to use row indices.",
        )
    counts = Counter(ids)
    repeated = sorted(id_ for id_, n in counts.items() if n > 1)
    if repeated:
        raise TPODataError(
            f"Instruction ids must be unique; repeated: {_shorten(list(map(repr, repeated)))}.",
            "Pick a unique --instructions_id_column, or leave it unset to use row indices.",
        )
    return [
        {
            "id": id_,
            "instruction": row[column].strip(),
            "category": row.get("category") or UNCATEGORIZED,
        }
        for id_, row in zip(ids, kept)
    ]


def _row_ids(rows: list[dict]) -> str:
    return _shorten([repr(row.get("id", "?")) for row in rows])


def _shorten(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    return shown + (f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")


def _preview(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= width else text[: width - 3] + "...")


# ---------------------------------------------------------------- slicing (pure)


def plan_slices(
    ids: list[str], holdout_size: int, seed: int, categories: Mapping[str, str] | None = None
) -> tuple[list[str], list[str]]:
    """Shuffle ``ids`` deterministically and return ``(holdout_ids, training_order)``.

    The order is a sort by ``sha256(seed, id)``: it does not depend on the input
    order or on the Python version, and adding ids keeps the others' relative
    order. With ``categories`` (id -> category) the holdout takes ids from each
    category in turn, so per-category evaluation gets near-equal counts.
    """
    if len(set(ids)) != len(ids):
        raise TPODataError(
            "Instruction ids passed to plan_slices are not unique.",
            "Validate the instructions first (validate_instructions) so each id is unique.",
        )
    if holdout_size < 0 or holdout_size >= len(ids):
        raise TPODataError(
            f"--holdout_size {holdout_size} is invalid for {len(ids)} instructions: it must be "
            "at least 0 and leave some instructions for training.",
            f"Use a --holdout_size between 0 and {max(len(ids) - 1, 0)}, or add instructions.",
        )
    order = sorted(ids, key=lambda id_: hashlib.sha256(f"{seed}\0{id_}".encode()).hexdigest())
    if categories is None:
        return order[:holdout_size], order[holdout_size:]
    queues: dict[str, list[str]] = {}
    for id_ in order:
        queues.setdefault(categories.get(id_, UNCATEGORIZED), []).append(id_)
    # Round-robin over categories; reversed lists so pop() yields hash order.
    pending = [list(reversed(queues[name])) for name in sorted(queues)]
    holdout: list[str] = []
    while len(holdout) < holdout_size:
        for queue in pending:
            if queue and len(holdout) < holdout_size:
                holdout.append(queue.pop())
    held = set(holdout)
    return holdout, [id_ for id_ in order if id_ not in held]


def next_slice(training_order: list[str], used: set[str], size: int) -> list[str]:
    """The first ``size`` ids of ``training_order`` that are not in ``used``."""
    if size < 1:
        raise TPODataError(
            f"--instructions_per_iteration must be at least 1, got {size}.",
            "Pass a positive --instructions_per_iteration.",
        )
    fresh = [id_ for id_ in training_order if id_ not in used]
    if len(fresh) < size:
        raise TPODataError(
            f"Only {len(fresh)} unused training instructions remain (of {len(training_order)}), "
            f"but this iteration needs {size}.",
            f"Use --instructions_per_iteration {len(fresh)} or less, or supply more "
            "instructions with --instructions (a new source needs a new ledger/output directory).",
        )
    return fresh[:size]


# ---------------------------------------------------------------- ledger (I/O)


class SliceLedger:
    """A JSON file recording which instruction ids each iteration used.

    It also keeps the fingerprint of the source the ids came from, so a run
    cannot silently continue on a different instruction set or slicing plan.
    """

    VERSION = 1

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._source: dict | None = None
        self._iterations: dict[int, list[str]] = {}
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text("utf-8"))
            self._source = data["source"]
            self._iterations = {int(k): list(v) for k, v in data["iterations"].items()}
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
            raise TPODataError(
                f"The slice ledger {self.path} is unreadable ({type(err).__name__}).",
                "Restore it from a backup, or move it away to start a new run "
                "(earlier iterations' slices are then forgotten and may be reused).",
            ) from None

    def used_ids(self) -> set[str]:
        return {id_ for ids in self._iterations.values() for id_ in ids}

    def slice_for(self, iteration: int) -> list[str] | None:
        ids = self._iterations.get(iteration)
        return None if ids is None else list(ids)

    def check_source(self, source_fingerprint: dict, new_run: str = "use a new output directory for a "
                     "new run") -> None:
        """Raise unless the ledger is new or was written for this instruction source and plan.

        ``new_run`` ends the error's fix: the way out when the change was meant.
        """
        if self._source is None:
            return
        # Keys a ledger written by an older version lacks are not compared.
        current = {k: v for k, v in source_fingerprint.items() if k in self._source}
        differ = {k for k in self._source if self._source[k] != current.get(k)}
        if not differ:
            return
        if differ <= {"count", "ids_sha256", "rows_sha256"}:
            raise TPODataError(
                f"The instruction source changed since the slice ledger {self.path} was written "
                f"(same flags, other content: rows edited, re-ordered, added or removed; "
                f"{_differences(self._source, current)}): its ids may now name other instructions.",
                f"Restore the source the run started with, or {new_run}.",
            )
        raise TPODataError(
            f"The slice ledger {self.path} was written for a different instruction source "
            f"or slicing plan: {_differences(self._source, current)}.",
            f"Run with the same --instructions, column, revision, --holdout_size and --slice_seed as "
            f"before, or {new_run}.",
        )

    def record(self, iteration: int, ids: list[str], source_fingerprint: dict) -> None:
        """Record ``ids`` for ``iteration``; recording the same thing again is a no-op."""
        self.check_source(source_fingerprint)
        previous = self._iterations.get(iteration)
        if previous is not None:
            if previous != list(ids):
                raise TPODataError(
                    f"Iteration {iteration} is already recorded in {self.path} with a "
                    f"different slice of {len(previous)} ids "
                    f"({_shorten(list(map(repr, previous)))}).",
                    "Resume with the recorded slice, or use a new output directory for a new run.",
                )
            return
        reused = sorted(set(ids) & self.used_ids())
        if reused:
            raise TPODataError(
                f"Iteration {iteration} would reuse instructions from earlier iterations: "
                f"{_shorten(list(map(repr, reused)))}.",
                "Take the slice from next_slice with the ledger's used ids.",
            )
        self._source = dict(source_fingerprint)
        self._iterations[iteration] = list(ids)
        self._write()

    def _write(self) -> None:
        data = {
            "version": self.VERSION,
            "source": self._source,
            "iterations": {str(k): v for k, v in sorted(self._iterations.items())},
        }
        write_text_atomic(self.path, json.dumps(data, indent=2))


def _differences(recorded: dict, current: dict) -> str:
    keys = sorted(k for k in recorded.keys() | current.keys() if recorded.get(k) != current.get(k))
    return "; ".join(
        f"{key} was {json.dumps(recorded.get(key))}, now {json.dumps(current.get(key))}"
        for key in keys
    )


# ---------------------------------------------------------------- glue


def source_fingerprint(rows: list[dict], args: InstructionArguments) -> dict:
    """Identify the instruction source and slicing plan the ledger's ids refer to."""
    source = args.instructions
    if source != BUILTIN and Path(source).expanduser().exists():
        source = str(Path(source).expanduser().resolve())
    ids = sorted(row["id"] for row in rows)
    return {
        "source": source,
        "config": args.instructions_config,
        "split": args.instructions_split,
        "revision": args.instructions_revision,
        "column": args.instructions_column,
        "category_column": args.instructions_category_column,
        "count": len(ids),
        "ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
        # Ids alone miss a source edited or re-ordered in place: row-<index> ids then name
        # other instructions, and "fresh" slices would repeat trained ones.
        "rows_sha256": hashlib.sha256("\n".join(sorted(
            f"{row['id']}\0{row['category']}\0{row['instruction']}" for row in rows)).encode()).hexdigest(),
        # The holdout depends on these and on the categories: changing them
        # mid-run could move already-trained instructions into the evaluation set.
        "holdout_size": args.holdout_size,
        "slice_seed": args.slice_seed,
    }


def select_iteration_rows(
    rows: list[dict], args: InstructionArguments, ledger: SliceLedger, iteration: int,
    check: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """The rows iteration ``iteration`` trains on, recorded in ``ledger``.

    A resumed iteration gets exactly the rows it had before; a new one takes
    the next unused slice of the training order. ``check`` sees a new slice
    before it is recorded: a slice it refuses is not burnt.
    """
    fingerprint = source_fingerprint(rows, args)
    ledger.check_source(fingerprint)  # before looking up recorded ids the source may lack
    by_id = {row["id"]: row for row in rows}
    ids = ledger.slice_for(iteration)
    if ids is None:
        _, training_order = _plan(rows, args)
        ids = next_slice(training_order, ledger.used_ids(), args.instructions_per_iteration)
    selected = [by_id[id_] for id_ in ids]
    if check:
        check(selected)
    ledger.record(iteration, ids, fingerprint)
    return selected


def select_holdout_rows(rows: list[dict], args: InstructionArguments) -> list[dict]:
    """The rows reserved for evaluation, never handed out by ``select_iteration_rows``."""
    by_id = {row["id"]: row for row in rows}
    holdout, _ = _plan(rows, args)
    return [by_id[id_] for id_ in holdout]


def _plan(rows: list[dict], args: InstructionArguments) -> tuple[list[str], list[str]]:
    categories = {row["id"]: row["category"] for row in rows}
    return plan_slices(list(categories), args.holdout_size, args.slice_seed, categories)

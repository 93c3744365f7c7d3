"""Behaviour of instruction loading, validation, slicing and the slice ledger."""

from __future__ import annotations

import csv
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tpo_data.errors import TPODataError
from tpo_data.instructions import (
    InstructionArguments,
    SliceLedger,
    load_instructions,
    next_slice,
    plan_slices,
    select_holdout_rows,
    select_iteration_rows,
    source_fingerprint,
    validate_instructions,
)

CATEGORIES = {
    "reasoning", "math", "coding", "writing",
    "marketing", "health", "general_knowledge", "language",
}
FAST = settings(max_examples=60, deadline=None)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_parquet(path: Path, columns: dict[str, list]) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def load_error(**kwargs) -> str:
    with pytest.raises(TPODataError) as info:
        load_instructions(InstructionArguments(**kwargs))
    message = str(info.value)
    assert "How to fix:" in message
    return message


def make_rows(n: int, categories: int = 1) -> list[dict]:
    return [
        {"id": f"i{k}", "instruction": f"instruction number {k}", "category": f"c{k % categories}"}
        for k in range(n)
    ]


# ---------------------------------------------------------------- builtin set


@pytest.fixture(scope="module")
def builtin() -> list[dict]:
    return load_instructions(InstructionArguments())


def test_builtin_set_has_320_unique_instructions_in_8_categories(builtin):
    assert len(builtin) >= 320
    counts = Counter(row["category"] for row in builtin)
    assert set(counts) == CATEGORIES
    assert all(n >= 40 for n in counts.values())
    assert len({row["id"] for row in builtin}) == len(builtin)
    assert len({" ".join(row["instruction"].lower().split()) for row in builtin}) == len(builtin)


def test_builtin_rows_follow_the_id_scheme_and_length_limits(builtin):
    for row in builtin:
        category, number = row["id"].rsplit("-", 1)
        assert category == row["category"] and len(number) == 3 and number.isdigit()
        assert 8 <= len(row["instruction"].split()) <= 40, row


# ---------------------------------------------------------------- slicing (pure)


@FAST
@given(
    n=st.integers(2, 120),
    holdout_fraction=st.floats(0, 0.9),
    size=st.integers(1, 20),
    seed=st.integers(0, 2**32),
)
def test_slices_never_overlap_and_never_touch_the_holdout(n, holdout_fraction, size, seed):
    ids = [f"id-{k}" for k in range(n)]
    holdout_size = min(int(n * holdout_fraction), n - 1)
    holdout, order = plan_slices(ids, holdout_size, seed)
    assert len(holdout) == holdout_size
    assert sorted(holdout + order) == sorted(ids)

    used: set[str] = set()
    for _ in range(len(order) // size):
        batch = next_slice(order, used, size)
        assert len(batch) == size
        assert not used & set(batch)
        assert not set(holdout) & set(batch)
        used |= set(batch)
    with pytest.raises(TPODataError, match=f"Only {len(order) - len(used)} unused"):
        next_slice(order, used, size + len(order) - len(used))


@FAST
@given(ids=st.lists(st.text(min_size=1, max_size=8), min_size=2, max_size=40, unique=True),
       seed=st.integers(0, 1000), data=st.data())
def test_plan_is_deterministic_and_ignores_input_order(ids, seed, data):
    holdout_size = data.draw(st.integers(0, len(ids) - 1))
    shuffled = data.draw(st.permutations(ids))
    assert plan_slices(ids, holdout_size, seed) == plan_slices(list(shuffled), holdout_size, seed)


@FAST
@given(n=st.integers(10, 200), categories=st.integers(1, 8), seed=st.integers(0, 1000),
       data=st.data())
def test_holdout_is_balanced_across_categories(n, categories, seed, data):
    rows = make_rows(n, categories)
    by_id = {row["id"]: row["category"] for row in rows}
    holdout_size = data.draw(st.integers(0, n - 1))
    holdout, order = plan_slices(list(by_id), holdout_size, seed, by_id)
    assert len(holdout) == holdout_size and sorted(holdout + order) == sorted(by_id)
    # While no category runs out of ids, per-category counts differ by one at most.
    if holdout_size <= categories * (n // categories):
        counts = Counter(by_id[id_] for id_ in holdout)
        per_category = [counts[f"c{k}"] for k in range(categories)]
        assert max(per_category) - min(per_category) <= 1


def test_different_seeds_give_different_orders():
    ids = [f"id-{k}" for k in range(50)]
    assert plan_slices(ids, 5, 0) != plan_slices(ids, 5, 1)


def test_next_slice_error_says_how_many_remain_and_what_to_change():
    with pytest.raises(TPODataError) as info:
        next_slice(["a", "b", "c", "d"], {"a"}, 5)
    message = str(info.value)
    assert "Only 3 unused" in message and "needs 5" in message
    assert "--instructions_per_iteration 3" in message and "more instructions" in message


@pytest.mark.parametrize("holdout_size", [-1, 10, 11])
def test_holdout_must_leave_training_instructions(holdout_size):
    with pytest.raises(TPODataError, match="--holdout_size"):
        plan_slices([f"id-{k}" for k in range(10)], holdout_size, 0)


def test_slice_size_must_be_positive():
    with pytest.raises(TPODataError, match="at least 1"):
        next_slice(["a"], set(), 0)


# ---------------------------------------------------------------- iteration rows and ledger


@FAST
@given(n=st.integers(20, 80), size=st.integers(1, 8), holdout=st.integers(0, 10),
       seed=st.integers(0, 100), categories=st.integers(1, 4))
def test_iterations_resume_with_the_same_rows(n, size, holdout, seed, categories):
    rows = make_rows(n, categories)
    args = InstructionArguments(instructions_per_iteration=size, holdout_size=holdout,
                                slice_seed=seed)
    held = {row["id"] for row in select_holdout_rows(rows, args)}
    assert len(held) == holdout
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ledger.json"
        iterations = range(1, min(4, (n - holdout) // size) + 1)
        first = {t: select_iteration_rows(rows, args, SliceLedger(path), t) for t in iterations}
        seen: set[str] = set()
        for batch in first.values():
            ids = {row["id"] for row in batch}
            assert len(ids) == size and not ids & seen and not ids & held
            seen |= ids
        # A fresh ledger object (a restarted run) gets exactly the same rows back.
        reopened = SliceLedger(path)
        for t in reversed(iterations):
            assert select_iteration_rows(rows, args, reopened, t) == first[t]


def test_ledger_persists_slices_and_fingerprint(tmp_path):
    path = tmp_path / "run" / "ledger.json"
    ledger = SliceLedger(path)
    assert ledger.used_ids() == set() and ledger.slice_for(1) is None
    ledger.record(1, ["a", "b"], {"source": "x"})
    ledger.record(2, ["c"], {"source": "x"})
    ledger.record(2, ["c"], {"source": "x"})  # same again: no-op

    reopened = SliceLedger(path)
    assert reopened.slice_for(1) == ["a", "b"] and reopened.slice_for(2) == ["c"]
    assert reopened.used_ids() == {"a", "b", "c"}
    assert json.loads(path.read_text())["source"] == {"source": "x"}
    assert [p.name for p in path.parent.iterdir()] == ["ledger.json"]  # no temp files left


def test_ledger_refuses_a_different_slice_for_a_recorded_iteration(tmp_path):
    ledger = SliceLedger(tmp_path / "ledger.json")
    ledger.record(1, ["a", "b"], {"source": "x"})
    with pytest.raises(TPODataError, match="Iteration 1 is already recorded"):
        ledger.record(1, ["a", "c"], {"source": "x"})
    assert SliceLedger(tmp_path / "ledger.json").slice_for(1) == ["a", "b"]


def test_ledger_refuses_ids_used_by_another_iteration(tmp_path):
    ledger = SliceLedger(tmp_path / "ledger.json")
    ledger.record(1, ["a", "b"], {"source": "x"})
    with pytest.raises(TPODataError, match="would reuse instructions from earlier iterations: 'b'"):
        ledger.record(2, ["b", "c"], {"source": "x"})


def test_ledger_refuses_a_different_source_and_names_both(tmp_path):
    ledger = SliceLedger(tmp_path / "ledger.json")
    ledger.record(1, ["a"], {"source": "builtin", "count": 320})
    with pytest.raises(TPODataError) as info:
        SliceLedger(tmp_path / "ledger.json").record(2, ["b"], {"source": "mine.jsonl", "count": 9})
    message = str(info.value)
    assert 'source was "builtin", now "mine.jsonl"' in message and "count was 320, now 9" in message
    assert "new output directory" in message


def test_changing_the_slicing_plan_mid_run_is_refused(tmp_path, builtin):
    ledger = SliceLedger(tmp_path / "ledger.json")
    select_iteration_rows(builtin, InstructionArguments(), ledger, 1)
    with pytest.raises(TPODataError, match="holdout_size"):
        select_iteration_rows(builtin, InstructionArguments(holdout_size=10), ledger, 2)


def test_resuming_on_a_source_that_lost_recorded_ids_is_refused(tmp_path, builtin):
    ledger = SliceLedger(tmp_path / "ledger.json")
    (first, *_) = select_iteration_rows(builtin, InstructionArguments(), ledger, 1)
    fewer = [row for row in builtin if row["id"] != first["id"]]
    with pytest.raises(TPODataError, match="instruction source changed since .* count was 320, now 319"):
        select_iteration_rows(fewer, InstructionArguments(), ledger, 1)


def test_a_source_edited_in_place_is_refused(tmp_path):
    # Without an id column ids are row-<index>: a re-ordered file keeps every id and the count,
    # but the ids now name other instructions, so "fresh" slices (and the holdout) would hold
    # trained ones.
    from tpo_data.evaluation import holdout_rows

    source = tmp_path / "mine.jsonl"
    texts = [f"Instruction number {i}?" for i in range(30)]
    source.write_text("".join(json.dumps({"instruction": t}) + "\n" for t in texts))
    args = InstructionArguments(instructions=str(source), holdout_size=5, instructions_per_iteration=5)
    out = tmp_path / "run"
    out.mkdir()
    select_iteration_rows(load_instructions(args), args, SliceLedger(out / "slices.json"), 1)
    source.write_text("".join(json.dumps({"instruction": t}) + "\n" for t in reversed(texts)))
    with pytest.raises(TPODataError, match=r"(?s)instruction source changed since .*re-ordered.*rows_sha256 was"
                                           r".*Restore the source the run started with, or use a new output"):
        select_iteration_rows(load_instructions(args), args, SliceLedger(out / "slices.json"), 2)
    with pytest.raises(TPODataError, match=r"(?s)instruction source changed.*Restore the source the run started "
                                           r"with, or evaluate another run's models with their own output"):
        holdout_rows(args, 0, out)


def test_a_ledger_from_before_rows_were_fingerprinted_still_resumes(tmp_path, builtin):
    path = tmp_path / "ledger.json"
    first = select_iteration_rows(builtin, InstructionArguments(), SliceLedger(path), 1)
    data = json.loads(path.read_text())
    del data["source"]["rows_sha256"]
    path.write_text(json.dumps(data))
    assert select_iteration_rows(builtin, InstructionArguments(), SliceLedger(path), 1) == first
    assert select_iteration_rows(builtin, InstructionArguments(), SliceLedger(path), 2)


def test_unreadable_ledger_is_reported(tmp_path):
    path = tmp_path / "ledger.json"
    path.write_text("{not json")
    with pytest.raises(TPODataError, match="ledger .* unreadable"):
        SliceLedger(path)


def test_fingerprint_identifies_source_and_ids(builtin):
    fingerprint = source_fingerprint(builtin, InstructionArguments())
    assert fingerprint["source"] == "builtin" and fingerprint["count"] == len(builtin)
    assert fingerprint != source_fingerprint(builtin[1:], InstructionArguments())


# ---------------------------------------------------------------- local files


def test_local_files_load_in_every_format(tmp_path):
    texts = ["Explain tides.", "Write a haiku about rain."]
    records = [{"text": t, "key": k, "cat": "x"} for k, t in enumerate(texts)]
    (tmp_path / "a.json").write_text(json.dumps(records))
    sources = [
        tmp_path / "a.json",
        write_jsonl(tmp_path / "a.jsonl", records),
        write_csv(tmp_path / "a.csv", ["text", "key", "cat"], [r.values() for r in records]),
        write_parquet(tmp_path / "a.parquet", {"text": texts, "key": [0, 1], "cat": ["x", "x"]}),
    ]
    expected = [{"id": str(k), "instruction": t, "category": "x"} for k, t in enumerate(texts)]
    for path in sources:
        rows = load_instructions(InstructionArguments(
            instructions=str(path), instructions_column="text",
            instructions_id_column="key", instructions_category_column="cat",
        ))
        assert rows == expected, path


def test_defaults_are_row_index_ids_and_uncategorized(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "One."}, {"instruction": " Two. "}])
    assert load_instructions(InstructionArguments(instructions=str(path))) == [
        {"id": "row-0", "instruction": "One.", "category": "uncategorized"},
        {"id": "row-1", "instruction": "Two.", "category": "uncategorized"},
    ]


def test_missing_file_is_reported(tmp_path):
    message = load_error(instructions=str(tmp_path / "nope.jsonl"))
    assert "not found" in message and "nope.jsonl" in message and "--instructions" in message


def test_unsupported_extension_is_reported(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("Explain tides.\n")
    message = load_error(instructions=str(path))
    assert "Unsupported" in message and ".jsonl" in message and ".parquet" in message


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_missing_column_lists_the_columns(tmp_path, fmt):
    path = tmp_path / f"a.{fmt}"
    if fmt == "jsonl":
        write_jsonl(path, [{"prompt": "Explain tides.", "source": "me"}])
    elif fmt == "csv":
        write_csv(path, ["prompt", "source"], [["Explain tides.", "me"]])
    else:
        write_parquet(path, {"prompt": ["Explain tides."], "source": ["me"]})
    message = load_error(instructions=str(path))
    assert "'instruction' not found" in message
    assert "'prompt'" in message and "'source'" in message and "--instructions_column" in message


def test_missing_id_column_is_reported(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Explain tides."}])
    message = load_error(instructions=str(path), instructions_id_column="uid")
    assert "'uid' not found" in message and "--instructions_id_column" in message


def test_blank_instructions_are_reported_with_their_ids(tmp_path):
    texts = [["Explain tides."], [""], ["   "], ["Ok then."]]
    path = write_csv(tmp_path / "a.csv", ["instruction"], texts)
    message = load_error(instructions=str(path))
    assert "2 instruction(s) are empty or whitespace-only" in message
    assert "'row-1'" in message and "'row-2'" in message and "'row-0'" not in message


def test_non_string_instructions_are_reported_with_their_ids(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Explain tides."}, {"instruction": 42}, {"instruction": None},
    ])
    message = load_error(instructions=str(path))
    assert "2 instruction(s) are not strings" in message
    assert "int" in message and "NoneType" in message
    assert "'row-1'" in message and "'row-2'" in message


def test_null_parquet_values_are_reported(tmp_path):
    path = write_parquet(tmp_path / "a.parquet", {"instruction": ["Explain tides.", None]})
    assert "'row-1'" in load_error(instructions=str(path))


def test_only_the_first_few_bad_rows_are_listed():
    rows = [{"id": f"r{k}", "instruction": ""} for k in range(12)]
    with pytest.raises(TPODataError, match="'r4' and 7 more"):
        validate_instructions(rows, "instruction", "error")


def test_duplicates_are_reported_or_dropped(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Explain tides."},
        {"instruction": "Write a poem."},
        {"instruction": "  explain   TIDES. "},
    ])
    message = load_error(instructions=str(path))
    assert "1 duplicate instruction(s)" in message and "'row-2' repeats 'row-0'" in message
    assert "--on_duplicates drop" in message
    rows = load_instructions(InstructionArguments(instructions=str(path), on_duplicates="drop"))
    assert [row["id"] for row in rows] == ["row-0", "row-1"]


def test_duplicate_ids_are_reported(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Explain tides.", "uid": "x"}, {"instruction": "Write a poem.", "uid": "x"},
    ])
    message = load_error(instructions=str(path), instructions_id_column="uid")
    assert "ids must be unique" in message and "'x'" in message


def test_unknown_duplicate_policy_is_reported():
    with pytest.raises(TPODataError, match="--on_duplicates"):
        validate_instructions(make_rows(2), "instruction", "keep")


def test_invalid_json_line_is_reported(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"instruction": "Explain tides."}\n{oops\n')
    assert "line 2 is not valid JSON" in load_error(instructions=str(path))


def test_empty_file_is_reported(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text("")
    assert "has no rows" in load_error(instructions=str(path))


# ---------------------------------------------------------------- Hub datasets (through the Hub stand-in)

HUB_INSTRUCTIONS = """
import json, sys
from huggingface_hub import HfApi
from tpo_data.errors import TPODataError
from tpo_data.instructions import InstructionArguments, load_instructions

a = json.loads(sys.argv[1])
if a.get("rows"):
    api, repo = HfApi(), "stand-in-user/prompts"
    api.create_repo(repo, repo_type="dataset")
    card = "---\\nconfigs:\\n- config_name: en\\n  data_files:\\n  - split: test\\n    path: en/test.jsonl\\n---\\n"
    api.upload_file(path_or_fileobj=card.encode(), path_in_repo="README.md", repo_id=repo, repo_type="dataset")
    for i, rows in enumerate(a["rows"]):  # revision v1 holds the first rows; main the later ones
        data = "".join(json.dumps(r) + "\\n" for r in rows).encode()
        api.upload_file(path_or_fileobj=data, path_in_repo="en/test.jsonl", repo_id=repo, repo_type="dataset")
        if i == 0:
            api.create_tag(repo, tag="v1", repo_type="dataset")
try:
    print(json.dumps({"rows": load_instructions(InstructionArguments(**a["args"]))}))
except TPODataError as err:
    print(json.dumps({"error": str(err)}))
"""


def _load_from_standin(tmp_path: Path, hub, payload: dict) -> dict:
    import subprocess

    from test_hub import TOKEN, client_env

    result = subprocess.run([sys.executable, "-c", HUB_INSTRUCTIONS, json.dumps(payload)],
                            env=client_env(tmp_path, hub.url, TOKEN), capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert TOKEN not in result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_hub_dataset_is_loaded_with_config_split_and_revision(tmp_path):
    from hub_standin import HubStandin

    first = [{"prompt": "Explain tides.", "prompt_id": "p1"}, {"prompt": "Name a prime.", "prompt_id": "p2"}]
    later = [{"prompt": "Something else.", "prompt_id": "p3"}]
    args = {"instructions": "stand-in-user/prompts", "instructions_config": "en", "instructions_split": "test",
            "instructions_column": "prompt", "instructions_id_column": "prompt_id"}
    with HubStandin(tmp_path / "hub") as hub:
        pinned = _load_from_standin(tmp_path, hub, {"rows": [first, later],
                                                    "args": {**args, "instructions_revision": "v1"}})
        newest = _load_from_standin(tmp_path, hub, {"args": args})
        # A config the card does not name: the error says what to check, offline use included.
        missing = _load_from_standin(tmp_path, hub, {"args": {**args, "instructions_config": "fr"}})
    assert pinned["rows"] == [{"id": "p1", "instruction": "Explain tides.", "category": "uncategorized"},
                              {"id": "p2", "instruction": "Name a prime.", "category": "uncategorized"}]
    assert newest["rows"] == [{"id": "p3", "instruction": "Something else.", "category": "uncategorized"}]
    assert "Could not load the Hub dataset stand-in-user/prompts, config='fr', split='test'" in missing["error"]
    assert "--instructions instructions.jsonl" in missing["error"] and "to_json" in missing["error"]


def test_unloadable_hub_dataset_explains_offline_use_without_leaking_tokens(tmp_path):
    """A proxy that echoes the request's Authorization header into its error: the message is scrubbed."""
    from hub_standin import HubStandin

    args = {"instructions": "stand-in-user/prompts", "instructions_config": "en", "instructions_split": "test"}
    with HubStandin(tmp_path / "hub") as hub:
        made = _load_from_standin(tmp_path / "a", hub, {"rows": [[{"prompt": "Explain tides."}]],
                                                        "args": {**args, "instructions_column": "prompt"}})
        assert len(made["rows"]) == 1
        hub.add_faults("resolve", *["503-echo-auth"] * 50)
        failed = _load_from_standin(tmp_path / "b", hub, {"args": args})  # another, empty cache
        echoed = 50 - len(hub.pending_faults().get("resolve", []))
    assert echoed >= 1  # the client met the echoing proxy; its output held no token (_load_from_standin)
    message = failed["error"]
    assert "Could not load the Hub dataset stand-in-user/prompts, config='en', split='test'" in message
    assert "offline" in message and "--instructions instructions.jsonl" in message

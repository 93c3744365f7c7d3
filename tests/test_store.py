"""Local store: layout, manifest, atomic writes, immutability, verification, scrubbing, CLI."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import datasets
import pytest
import yaml

from tpo_data import secrets
from tpo_data.card import compute_stats, data_file_path
from tpo_data.cli import main as cli_main
from tpo_data.engines import EngineArguments, api_key
from tpo_data.errors import TPODataError
from tpo_data.store import MANIFEST, LocalStore, write_iteration

RECIPE = {
    "policy": "SmolLM2-135M-Instruct",
    "judge": "reward-model",
    "samples_per_instruction": 4,
    "rho": 0.0,
}
PIPELINE_YAML = "distilabel:\n  version: 1.5.3\npipeline:\n  name: tpo-generate\n  steps: []\n"


def make_iteration(
    iteration: int, n_instructions: int = 6, n_samples: int = 4
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Small synthetic ``pairs`` and ``candidates`` tables following docs/SCHEMA.md."""
    rng = random.Random(iteration)
    candidates: list[dict[str, Any]] = []
    pairs: list[dict[str, Any]] = []
    for i in range(n_instructions):
        instruction = f"Question {i} of iteration {iteration}: explain topic {rng.randint(0, 999)}."
        category = ("math", "writing", "coding")[i % 3]
        rows = []
        for j in range(n_samples):
            thought = f"Let me think about {i}.{j}." if j % 2 == 0 else ""
            response = " ".join(["answer"] * rng.randint(1, 30))
            parsed = not (j == n_samples - 1 and i % 2)
            score = round(rng.uniform(-3.0, 3.0), 4) if parsed else None
            rows.append(
                {
                    "instruction_id": f"it{iteration}-q{i}",
                    "instruction": instruction,
                    "category": category,
                    "sample_index": j,
                    "generation": f"{thought}\nHere is my response:\n{response}",
                    "thought": thought,
                    "response": response,
                    "parsed": parsed,
                    "score": score,
                    "length": len(response),
                    "norm_score": None if score is None else round(score / 3.0, 4),
                    "iteration": iteration,
                }
            )
        candidates += rows
        scored = sorted((r for r in rows if r["score"] is not None), key=lambda r: r["score"])
        if i == 0 or len(scored) < 2:
            continue  # one instruction without a pair, as happens when all samples tie or fail
        best, worst = scored[-1], scored[0]
        pairs.append(
            {
                "prompt": [
                    {"role": "user", "content": f"Think first, then answer.\n{instruction}"}
                ],
                "chosen": [{"role": "assistant", "content": best["generation"]}],
                "rejected": [{"role": "assistant", "content": worst["generation"]}],
                "instruction_id": best["instruction_id"],
                "instruction": instruction,
                "category": category,
                "chosen_thought": best["thought"],
                "chosen_response": best["response"],
                "rejected_thought": worst["thought"],
                "rejected_response": worst["response"],
                "chosen_score": best["score"],
                "rejected_score": worst["score"],
                "chosen_length": best["length"],
                "rejected_length": worst["length"],
                "score_gap": round(best["score"] - worst["score"], 4),
                "rho": 0.0,
                "iteration": iteration,
            }
        )
    return datasets.Dataset.from_list(pairs), datasets.Dataset.from_list(candidates)


def write_test_iteration(
    store: LocalStore, iteration: int, version: str | None = None, **overrides: Any
) -> Path:
    pairs, candidates = make_iteration(iteration)
    kwargs: dict[str, Any] = {
        "pairs": pairs,
        "candidates": candidates,
        "iteration": iteration,
        "parent_model": "HuggingFaceTB/SmolLM2-135M-Instruct"
        if iteration == 1
        else f"outputs/models/iter-{iteration - 1}",
        "parent_version": None if iteration == 1 else f"iter-{iteration - 1}",
        "recipe": RECIPE,
        "seed": 1234,
        "instruction_slice": {"start": 0, "stop": 6},
        "pipeline_yaml": PIPELINE_YAML,
        **overrides,
    }
    return write_iteration(store, version or f"iter-{iteration}", **kwargs)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_hashes(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): sha256(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> LocalStore:
    """A store with iter-1 and iter-2, shared by the read-only tests."""
    store = LocalStore(tmp_path_factory.mktemp("store") / "tpo")
    write_test_iteration(store, 1)
    write_test_iteration(store, 2)
    return store


def test_layout_and_manifest(built: LocalStore) -> None:
    folder = built.path("iter-2")
    manifest = built.manifest("iter-2")
    expected_files = {
        "README.md",
        data_file_path("pairs"),
        data_file_path("candidates"),
        "pipeline.yaml",
        "plots/score_distribution.png",
        "plots/length_distribution.png",
        "plots/parse_rate.png",
    }
    assert set(manifest["files"]) == expected_files
    assert set(tree_hashes(folder)) == expected_files | {MANIFEST}
    for rel, info in manifest["files"].items():
        assert info["sha256"] == sha256(folder / rel)
        assert info["size"] == (folder / rel).stat().st_size
    pairs, candidates = make_iteration(2)
    assert manifest["row_counts"] == {"pairs": pairs.num_rows, "candidates": candidates.num_rows}
    assert manifest["iteration"] == 2 and manifest["parent_version"] == "iter-1"
    assert manifest["parent_model"] == "outputs/models/iter-1"
    assert manifest["recipe"] == RECIPE and manifest["seed"] == 1234
    assert manifest["instruction_slice"] == {"start": 0, "stop": 6}
    assert {"python", "datasets", "huggingface-hub", "pyarrow", "tpo-data"} <= set(
        manifest["library_versions"]
    )
    assert manifest["stats"] == compute_stats(candidates, pairs)
    for png in (f for f in expected_files if f.endswith(".png")):
        assert (folder / png).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert (folder / "pipeline.yaml").read_text() == PIPELINE_YAML


def test_card_declares_configs_and_carries_lineage(built: LocalStore) -> None:
    card = (built.path("iter-2") / "README.md").read_text()
    header = yaml.safe_load(card.split("---\n")[1])
    configs = {c["config_name"]: c for c in header["configs"]}
    assert set(configs) == {"pairs", "candidates"} and configs["pairs"].get("default") is True
    assert configs["candidates"]["data_files"] == [
        {"split": "train", "path": "data/candidates/train-*"}
    ]
    for text in (
        "iter-1",
        "outputs/models/iter-1",
        "reward-model",
        "pipeline.yaml",
        "plots/score_distribution.png",
        "parse_rate",
    ):
        assert text in card
    assert PIPELINE_YAML.strip() in card
    # The snippet loads this version by its default tag and says a custom --tag replaces it.
    assert 'load_dataset(REPO_ID, "pairs", revision="iter-2", split="train")' in card
    assert '("iter-2" unless `--tag` named another)' in card


def test_datasets_load_dataset_reads_a_version_folder(built: LocalStore, tmp_path: Path) -> None:
    folder = str(built.path("iter-1"))
    pairs, candidates = make_iteration(1)
    # Plain datasets, no tpo-data involved: the default config is pairs.
    assert (
        datasets.load_dataset(folder, split="train", cache_dir=str(tmp_path)).to_list()
        == pairs.to_list()
    )
    loaded = datasets.load_dataset(folder, "candidates", split="train", cache_dir=str(tmp_path))
    assert loaded.to_list() == candidates.to_list()
    assert built.load("iter-1", "pairs", cache_dir=str(tmp_path)).to_list() == pairs.to_list()
    with pytest.raises(TPODataError, match="no config 'nope'"):
        built.load("iter-1", "nope")


def test_versions_are_sorted_by_iteration(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    pairs, _ = make_iteration(1, n_instructions=3, n_samples=2)
    for version, iteration in (("iter-10", 10), ("iter-2", 2), ("iter-2-rerun", 2)):
        store.write_version(version, {"pairs": pairs}, {"iteration": iteration}, "---\n---\n")
    assert [m["version"] for m in store.versions()] == ["iter-2", "iter-2-rerun", "iter-10"]
    assert all(len(m["manifest_sha256"]) == 64 for m in store.versions())
    with pytest.raises(TPODataError) as err:
        store.path("iter-3")
    assert "existing versions: iter-10, iter-2, iter-2-rerun" in str(err.value)
    assert "How to fix" in str(err.value)


def test_existing_version_is_refused_and_untouched(built: LocalStore) -> None:
    before = tree_hashes(built.path("iter-1"))
    with pytest.raises(TPODataError, match="version iter-1 already exists") as err:
        write_test_iteration(built, 1)
    assert "write it under another version name or to another store" in str(err.value)
    pairs, _ = make_iteration(1)
    # The fix names the flag of the command that chose the name, when there is one.
    with pytest.raises(TPODataError, match="pass another --new-version \\(for example iter-1-rerun\\)"):
        built.write_version("iter-1", {"pairs": pairs}, {}, "card", flag="--new-version")
    assert tree_hashes(built.path("iter-1")) == before
    assert not [p for p in built.root.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("name", ["../escape", "iter 1", "-iter", "iter-1.", "a..b", "", "iter-1.lock", "reviews"])
def test_invalid_version_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(TPODataError, match="invalid version name"):
        LocalStore(tmp_path).write_version(name, {}, {}, "card")


@pytest.mark.parametrize(
    "rel",
    [
        "../evil.txt",
        "/etc/evil",
        "README.md",
        "manifest.json",
        "data/pairs/x.parquet",
        "./README.md",
        "README.md/",
        "./manifest.json",
        "plots/../README.md",
        "./data/pairs/x.parquet",
    ],
)
def test_extra_files_cannot_escape_or_shadow(tmp_path: Path, rel: str) -> None:
    with pytest.raises(TPODataError, match="not allowed"):
        LocalStore(tmp_path).write_version("v1", {}, {}, "card", {rel: b"x"})
    assert not (tmp_path / "v1").exists()


def test_writer_losing_the_rename_race_gets_a_clear_error(tmp_path: Path) -> None:
    """Another writer renames its folder into place after this writer's last check."""

    class RacedStore(LocalStore):
        checks = 0

        def check_new(self, version: str, flag: str | None = None) -> None:
            super().check_new(version, flag)
            self.checks += 1
            if self.checks == 3:  # write_iteration, write_version, then the one before the rename
                write_test_iteration(LocalStore(self.root), 2, version)

    store = RacedStore(tmp_path / "store")
    with pytest.raises(TPODataError, match="version iter-1 already exists") as err:
        write_test_iteration(store, 1)
    assert "write it under another version name or to another store" in str(err.value)
    store.verify("iter-1")
    assert store.manifest("iter-1")["iteration"] == 2  # the winner's data, untouched
    assert not [p for p in store.root.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize(
    "entry, problem",
    [
        ({"responses": [{"label": "no"}]}, "has no instruction_id"),
        ({"instruction_id": "it1-q1", "responses": [{"label": "Yes"}]}, "has the label 'Yes'"),
        ({"instruction_id": "it1-q1", "responses": {"label": "no"}}, "has responses that are not"),
        ("it1-q1", "is not an object"),
    ],
)
def test_argilla_apply_refuses_malformed_review_entries(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], entry: Any, problem: str
) -> None:
    """A hand-edited reviews file names the file, the entry and the fix (no server needed)."""
    store = LocalStore(tmp_path / "store")
    write_test_iteration(store, 1)
    reviews = tmp_path / "reviews.json"
    good = {"instruction_id": "it1-q2", "responses": [{"reviewer": "ann", "label": "yes"}]}
    reviews.write_text(json.dumps({"version": "iter-1", "reviews": [good, entry]}))
    args = ["argilla", "apply", "iter-1", "--store", str(store.root), "--reviews", str(reviews)]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert f"entry reviews[1] in {reviews} {problem}" in err
    assert "How to fix: correct" in err and "pull the answers again" in err
    assert [m["version"] for m in store.versions()] == ["iter-1"]  # nothing written


def test_failure_mid_write_leaves_no_visible_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tpo_data.store as store_module

    store = LocalStore(tmp_path / "store")

    def crash(folder: Path) -> None:
        raise RuntimeError("simulated crash while syncing")

    monkeypatch.setattr(store_module, "_fsync_tree", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_test_iteration(store, 1)
    assert store.versions() == []
    assert list(store.root.iterdir()) == []  # the temporary folder was removed
    monkeypatch.undo()
    write_test_iteration(store, 1)  # the name is still free
    store.verify("iter-1")


def test_killed_process_mid_write_leaves_no_visible_version(tmp_path: Path) -> None:
    """A hard kill (no cleanup runs) leaves only a hidden .tmp folder that is never a version."""
    root = tmp_path / "store"
    script = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import tpo_data.store as store_module
        from test_store import write_test_iteration

        def die(folder):
            os._exit(9)  # like SIGKILL: no exception handlers, no cleanup

        store_module._fsync_tree = die
        write_test_iteration(store_module.LocalStore({str(root)!r}), 1)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 9, result.stderr
    leftovers = list(root.iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".tmp-")
    assert (leftovers[0] / "data" / "pairs").is_dir()  # it really died mid-write
    store = LocalStore(root)
    assert store.versions() == []
    with pytest.raises(TPODataError, match="not found"):
        store.path("iter-1")
    with pytest.raises(TPODataError, match="not found"):
        store.path(leftovers[0].name)
    write_test_iteration(store, 1)
    assert [m["version"] for m in store.versions()] == ["iter-1"]


def test_stale_tmp_folders_are_ignored_and_removed_on_write(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Crashed writes (.tmp-*) are never versions; the next write removes only old ones."""
    import time

    from tpo_data.store import STALE_TMP_AGE_S

    store = LocalStore(tmp_path / "store")
    write_test_iteration(store, 1)
    old = time.time() - STALE_TMP_AGE_S - 60
    stale, fresh, touched = (store.root / f".tmp-{name}" for name in ("stale", "fresh", "touched"))
    for folder in (stale, fresh, touched):
        (folder / "data" / "pairs").mkdir(parents=True)
        (folder / MANIFEST).write_text("{}")  # even with a manifest it is not a version
        (folder / "data" / "pairs" / "part.parquet").write_bytes(b"half")
    for folder in (stale, touched):
        for path in [*folder.rglob("*"), folder]:
            os.utime(path, (old, old))
    # A concurrent writer just wrote deep inside an old folder: it is in use.
    os.utime(touched / "data" / "pairs" / "part.parquet")

    assert [m["version"] for m in store.versions()] == ["iter-1"]
    assert cli_main(["versions", "--store", str(store.root), "--json"]) == 0
    assert [m["version"] for m in json.loads(capsys.readouterr().out)] == ["iter-1"]
    assert cli_main(["versions", "--store", str(store.root)]) == 0
    assert ".tmp-" not in capsys.readouterr().out
    assert stale.is_dir()  # reading never deletes

    write_test_iteration(store, 2)
    assert not stale.exists() and fresh.is_dir() and touched.is_dir()
    assert [m["version"] for m in store.versions()] == ["iter-1", "iter-2"]
    assert sorted(store.remove_stale_tmp(max_age_s=-1)) == [fresh.name, touched.name]
    assert not [p for p in store.root.iterdir() if p.name.startswith(".tmp-")]


def test_writer_whose_folder_was_removed_as_stale_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer paused past STALE_TMP_AGE_S loses its .tmp folder to another writer's cleanup:
    it must fail, not publish a version whose data files are gone."""
    from tpo_data import store as store_module

    store = LocalStore(tmp_path / "store")
    original = store_module._write_bytes

    def write_after_cleanup(path: Path, data: bytes) -> None:
        # The parquet files are written; now another writer's cleanup runs.
        store.remove_stale_tmp(max_age_s=-1)
        monkeypatch.setattr(store_module, "_write_bytes", original)
        original(path, data)

    monkeypatch.setattr(store_module, "_write_bytes", write_after_cleanup)
    lost = r"lost data/candidates/.*parquet, data/pairs/.*parquet: .* removed as stale"
    with pytest.raises(TPODataError, match=lost) as err:
        write_test_iteration(store, 1)
    assert "run the same command again" in str(err.value)
    assert store.versions() == [] and not list(store.root.iterdir())


def test_version_with_no_pairs_loads_empty_and_is_not_sent_for_review(tmp_path: Path) -> None:
    """Every instruction dropped is a real outcome: the version is written and reads back empty."""
    from tpo_data.curation import push_for_review

    pairs, candidates = make_iteration(1)
    store = LocalStore(tmp_path / "store")
    write_test_iteration(store, 1, pairs=pairs.select([]))
    empty = store.load("iter-1", "pairs")
    assert empty.num_rows == 0 and empty.features == pairs.features
    assert store.load("iter-1", "candidates").num_rows == candidates.num_rows
    with pytest.raises(TPODataError, match="version iter-1 has no pairs to review"):
        push_for_review(store, "iter-1", client=None)


def test_verify_detects_changes(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    folder = write_test_iteration(store, 1)
    store.verify("iter-1")
    (folder / "plots" / "extra.png").write_bytes(b"\x89PNG")
    with open(folder / data_file_path("pairs"), "ab") as f:
        f.write(b"tampered")
    with pytest.raises(TPODataError) as err:
        store.verify("iter-1")
    message = str(err.value)
    assert (
        f"changed {data_file_path('pairs')}" in message and "unexpected plots/extra.png" in message
    )
    assert "How to fix" in message


def test_secrets_never_reach_the_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_token = "tok" + "Q7x" * 10  # not hf_-shaped: only the env-var rule can catch it
    hf_shaped = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz01234567"
    argilla_key = "argilla.apikey.Zz9" + "k" * 20
    monkeypatch.setenv("HF_TOKEN", env_token)
    monkeypatch.setenv("ARGILLA_API_KEY", argilla_key)
    recipe = {
        **RECIPE,
        "api_key": env_token,
        "note": f"pushed with {hf_shaped}",
        "argilla": argilla_key,
    }
    pipeline_yaml = (
        f"{PIPELINE_YAML}  llm:\n    api_key: {env_token}\n"
        f"    headers: 'Authorization: Bearer {hf_shaped}'\n"
    )
    store = LocalStore(tmp_path / "store")
    folder = write_test_iteration(store, 1, recipe=recipe, pipeline_yaml=pipeline_yaml)
    for path in folder.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for secret in (env_token, hf_shaped, argilla_key):
                assert secret.encode() not in data, f"{secret[:5]}... leaked into {path.name}"
    assert "***" in (folder / "pipeline.yaml").read_text()
    assert store.manifest("iter-1")["recipe"]["api_key"] == "***"
    store.verify("iter-1")  # hashes are of the scrubbed bytes


def test_scrub_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", "legacy-token-value-123")
    text = (
        "token hf_abcdefghijklmnopqrstuvwxyz0123456789 and api_org_ABCDEFGHIJKLMNOPQRSTUV; "
        "Authorization: Bearer abc.def-ghi; legacy-token-value-123; "
        "keep hf_hub_download and hf_token_var"
    )
    cleaned = secrets.scrub(text)
    assert "abcdefghijklmnopqrstuvwxyz" not in cleaned and "api_org_ABC" not in cleaned
    assert "Bearer ***" in cleaned and "abc.def-ghi" not in cleaned
    assert "legacy-token-value-123" not in cleaned
    assert "hf_hub_download" in cleaned and "hf_token_var" in cleaned
    secrets.register("registered-secret-xyz")
    assert secrets.scrub("a registered-secret-xyz b") == "a *** b"
    assert "registered-secret-xyz" in secrets.secret_values()
    # A URL's password, in a JSON string too; a plain URL, a user without password, an e-mail stay.
    assert secrets.scrub('{"base_url": "https://alice:s3cr3t@h.example/v1"}') == '{"base_url": "https://alice:***@h.example/v1"}'
    kept = "http://h.example:8000/v1 ssh://git@github.com/o/r.git https://h.example?mail=me@x.org me@h.example"
    assert secrets.scrub(kept) == kept
    # The endpoint key is masked whichever variable --api_key_env names.
    monkeypatch.setenv("MY_ENDPOINT_KEY", "sk-endpoint-key-12345")
    assert api_key(EngineArguments(api_key_env="MY_ENDPOINT_KEY")) == "sk-endpoint-key-12345"
    assert secrets.scrub("key sk-endpoint-key-12345") == "key ***"


def test_version_text_that_quotes_bearer_stays_readable(tmp_path: Path) -> None:
    # Scrubbing runs on serialized text: masking `bearer \"` up to the next quote would eat the
    # backslash and leave a manifest that no command could read again.
    store = LocalStore(tmp_path)
    note = 'the judge as the bearer "of truth"; Authorization: Bearer abc.def-ghi'
    store.write_version("v1", {}, {"note": note}, "card")
    assert store.manifest("v1")["note"] == 'the judge as the bearer "of truth"; Authorization: Bearer ***'
    store.verify("v1")


LOG_THROUGH_DISTILABEL = """
import logging, multiprocessing, sys
from distilabel.utils.logging import setup_logging, stop_logging
from tpo_data import secrets

secrets.scrub_log_records()
setup_logging(log_queue=multiprocessing.Queue(), filename=sys.argv[1])  # as Pipeline.run does
try:
    raise ValueError("failed with hf_abcdefghijklmnopqrstuvwxyz0123456789")
except ValueError:
    logging.getLogger("tpo_data.test_scrub").exception("request to %s failed", sys.argv[2])
stop_logging()
"""


def test_log_records_are_scrubbed_whichever_handler_writes_them(tmp_path: Path) -> None:
    """distilabel replaces the root handlers during a run with its console handler and a
    pipeline.log file handler; records are scrubbed before any handler sees them. In a child
    process: distilabel's logging setup changes loggers for good."""
    log_file = tmp_path / "pipeline.log"
    done = subprocess.run([sys.executable, "-c", LOG_THROUGH_DISTILABEL, str(log_file),
                           "https://alice:endpoint-secret-1@h.example/v1"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    for written in (log_file.read_text(), done.stdout + done.stderr):
        assert "request to https://alice:***@h.example/v1 failed" in " ".join(written.split())
        assert "ValueError: failed with ***" in written
        assert "abcdefghijklmnopqrstuvwxyz" not in written and "endpoint-secret-1" not in written


def test_compute_stats() -> None:
    pairs, candidates = make_iteration(3)
    stats = compute_stats(candidates, pairs)
    parsed = [r["parsed"] for r in candidates]
    assert (
        stats["candidates"] == 24
        and stats["instructions"] == 6
        and stats["pairs"] == pairs.num_rows
    )
    assert stats["parse_rate"] == round(sum(parsed) / len(parsed), 4)
    assert stats["score_gap_mean"] == round(sum(pairs["score_gap"]) / pairs.num_rows, 4)
    assert set(stats["parse_rate_by_category"]) == {"math", "writing", "coding"}
    empty = compute_stats(candidates.select([]), pairs.select([]))
    assert empty["parse_rate"] is None and empty["pairs"] == 0


def test_cli_versions_and_show_local(built: LocalStore, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["versions", "--store", str(built.root), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(m["version"], m["iteration"], m["parent_version"]) for m in listed] == [
        ("iter-1", 1, None),
        ("iter-2", 2, "iter-1"),
    ]
    assert listed[1]["manifest_sha256"] == sha256(built.path("iter-2") / MANIFEST)

    assert cli_main(["versions", "--store", str(built.root)]) == 0
    table = capsys.readouterr().out
    assert "iter-1" in table and "iter-2" in table and listed[0]["manifest_sha256"][:8] in table

    assert cli_main(["show", "iter-2", "--store", str(built.root)]) == 0
    shown = capsys.readouterr().out
    assert "parse_rate" in shown and "outputs/models/iter-1" in shown

    assert cli_main(["show", "iter-7", "--store", str(built.root)]) == 2
    err = capsys.readouterr().err
    assert "iter-7" in err and "How to fix" in err and "iter-1, iter-2" in err

    assert cli_main(["versions", "--store", str(built.root / "typo")]) == 2
    assert "There is no store at" in capsys.readouterr().err


def test_cli_help_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tpo_data.cli", "publish", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ},
    )
    assert result.returncode == 0 and "--tag" in result.stdout and "HF_TOKEN" in result.stdout


def test_cli_flags_take_either_spelling_and_no_abbreviation(monkeypatch, capsys) -> None:
    # The recipe commands (TRL's parser) take --max_steps and --max-steps; the others must too.
    monkeypatch.chdir(Path(__file__).parents[1])  # pit-run runs from the repository root
    recipe = "recipes/pit-smollm2.yaml"
    printed = []
    for flag in ("--dry-run", "--dry_run"):
        assert cli_main(["pit-run", "--config", recipe, flag]) == 0  # runs nothing: prints each stage
        printed.append(capsys.readouterr().out.splitlines())
    assert printed[0] == printed[1] and len(printed[0]) == 8
    assert all(" done" in line or " to run: " in line for line in printed[0])
    # A prefix of a flag is refused, not read as the flag: these commands resume from files.
    with pytest.raises(SystemExit) as refused:
        cli_main(["pit-run", "--config", recipe, "--dry"])
    assert refused.value.code == 2 and "unrecognized arguments: --dry" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["generate", "iterate", "eval", "train"])
def test_recipe_command_help_names_the_command(command: str, capsys) -> None:
    # These parse with TrlParser, whose usage line would otherwise read "tpo-data [-h] ...".
    with pytest.raises(SystemExit) as done:
        cli_main([command, "--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and out.startswith(f"usage: tpo-data {command} [-h]")
    assert "--config" in out


def test_command_help_lists_defaults(capsys) -> None:
    with pytest.raises(SystemExit):
        cli_main(["pit-eval", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "improvement rounds of PIT and Self-Refine (default: 2)" in out
    assert "--engine {transformers,vllm} transformers: in process;" in out and "(default: transformers)" in out
    # A help that says what its default means is not given a second one.
    assert "the first answer y_0 (default: the PIT model itself) --temperature" in out


def test_same_version_name_in_two_stores_loads_each_stores_rows(tmp_path: Path) -> None:
    # datasets caches a local folder by its name; two stores with "iter-1" must not mix.
    first, second = LocalStore(tmp_path / "a"), LocalStore(tmp_path / "b")
    written = {}
    for store, n in ((first, 2), (second, 8)):
        pairs, candidates = make_iteration(1, n_instructions=n)
        write_iteration(store, "iter-1", pairs=pairs, candidates=candidates, iteration=1,
                        parent_model="m", recipe=RECIPE, seed=0, instruction_slice=[])
        written[store.root] = pairs.to_list()
    assert written[first.root] != written[second.root]
    assert first.load("iter-1").to_list() == written[first.root]
    assert second.load("iter-1").to_list() == written[second.root]


def test_read_only_store_loads_through_the_datasets_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shared store mounted read-only (as root, permissions cannot make one: os.access says so)."""
    from tpo_data import store as store_module

    store = LocalStore(tmp_path / "store")
    write_test_iteration(store, 1)
    before = tree_hashes(store.root)
    real_access = os.access
    monkeypatch.setattr(store_module.os, "access", lambda path, mode: (
        False if Path(path) == store.root and mode == os.W_OK else real_access(path, mode)))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    assert store.load("iter-1").to_list() == make_iteration(1)[0].to_list()
    assert tree_hashes(store.root) == before and not (store.root / ".datasets-cache").exists()
    assert list((tmp_path / "hf-cache" / "tpo-data" / ".datasets-cache").iterdir())


def test_plots_skip_missing_scores() -> None:
    # A parse failure kept as the rejected sample has no score (None).
    from tpo_data.card import make_plots

    pairs, candidates = make_iteration(1)
    pairs = pairs.map(lambda row, i: {"rejected_score": None if i == 0 else row["rejected_score"]},
                      with_indices=True)
    assert pairs[0]["rejected_score"] is None
    plots = make_plots(candidates, pairs)
    assert all(png.startswith(b"\x89PNG") for png in plots.values())


def test_cli_logging_keeps_library_chatter_out():
    """The CLI's log shows progress, not every HTTP request or matplotlib's notes on axis labels."""
    import logging

    from tpo_data.cli import setup_logging

    root = logging.getLogger()
    before = root.level
    root.setLevel(logging.INFO)  # as the CLI's basicConfig sets it (pytest's handlers come first)
    try:
        setup_logging(logging.INFO)
        assert logging.getLogger("tpo_data").isEnabledFor(logging.INFO)
        for name in ("httpx", "httpx2", "matplotlib.category"):
            logger = logging.getLogger(name)
            assert not logger.isEnabledFor(logging.INFO) and logger.isEnabledFor(logging.WARNING)
    finally:
        root.setLevel(before)


_LEAKY_MAIN = """
import os, sys
import distilabel  # installs rich tracebacks with show_locals=True
from tpo_data.cli import {entry}

def main(*_):
    token = os.environ["HF_TOKEN"]  # a local variable, as in hub.push_iteration
    raise {error}

{call}
"""


@pytest.mark.parametrize("entry, call, error, status, printed", [
    # Unguarded: what distilabel's hook prints, so the test below can fail.
    ("run_main", "main()", "RuntimeError('hub went away')", 1, "hub went away"),
    ("run_main", "run_main(main)", "RuntimeError('hub went away')", 1, "RuntimeError: hub went away"),
    ("run_main", "run_main(main)", "KeyboardInterrupt()", 130, "interrupted: rerun the same command"),
    ("guarded", "sys.exit(guarded(main))", "ValueError('bad ' + token)", 1, "ValueError: bad ***"),
])
def test_uncaught_errors_never_print_secrets(entry, call, error, status, printed) -> None:
    token = "hf_" + "Q" * 34
    proc = subprocess.run(
        [sys.executable, "-c", _LEAKY_MAIN.format(entry=entry, call=call, error=error)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "HF_TOKEN": token, "COLUMNS": "200"},
    )
    assert proc.returncode == status, proc.stderr
    assert printed in proc.stderr
    if call == "main()":
        assert token in proc.stderr  # distilabel 1.5.3's traceback shows the local variable
    else:
        assert token not in proc.stderr and "QQQQQQQQ" not in proc.stderr


_LIBRARY_USER = """
import os, sys
{first}
import tpo_data.judges  # imports distilabel's LLM and Task classes

def main():
    token = os.environ["HF_TOKEN"]
    raise RuntimeError("no verdict")

print("hook kept:", sys.excepthook is sys.__excepthook__, flush=True)
main()
"""


@pytest.mark.parametrize("first, kept", [("", True), ("import distilabel", False)])
def test_library_import_keeps_the_traceback_hook(first: str, kept: bool) -> None:
    """A script that uses tpo_data as a library gets Python's own tracebacks: no local variables.
    A script that imported distilabel itself keeps distilabel's hook (and its leak, shown here)."""
    token = "hf_" + "Q" * 34
    proc = subprocess.run(
        [sys.executable, "-c", _LIBRARY_USER.format(first=first)], capture_output=True, text=True,
        timeout=120, env={**os.environ, "HF_TOKEN": token, "COLUMNS": "200"},
    )
    assert proc.returncode == 1 and "RuntimeError: no verdict" in proc.stderr
    assert f"hook kept: {kept}" in proc.stdout
    assert (token in proc.stderr) is not kept


_NOTEBOOK_USER = """
import os
from IPython.core.interactiveshell import InteractiveShell

shell = InteractiveShell.instance(colors="nocolor")
shell.run_cell("{first}\\nimport tpo_data.judges")  # in a cell, as a notebook imports

print("patched:", sorted(set(vars(shell)) & {{"_showtraceback", "showtraceback", "showsyntaxerror"}}))
shell.run_cell('def main():\\n    token = os.environ["HF_TOKEN"]\\n    raise RuntimeError("no verdict")\\n')
shell.run_cell("import os; main()")
"""


@pytest.mark.parametrize("first, kept", [("", True), ("import distilabel", False)])
def test_notebook_import_keeps_ipython_tracebacks(first: str, kept: bool) -> None:
    """The same in a notebook (an IPython shell): its traceback hooks stay IPython's own."""
    token = "hf_" + "Q" * 34
    proc = subprocess.run(
        [sys.executable, "-c", _NOTEBOOK_USER.format(first=first)], capture_output=True, text=True,
        timeout=120, env={**os.environ, "HF_TOKEN": token, "COLUMNS": "200"},
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "RuntimeError: no verdict" in out, out
    patched = "[]" if kept else "['_showtraceback', 'showsyntaxerror', 'showtraceback']"
    assert f"patched: {patched}" in proc.stdout
    assert (token in out) is not kept


def _log_a_secret_and_fail(value: str) -> None:
    logging.getLogger("tpo_data.test").warning("the key is %s", value)
    raise SystemExit(3)


def test_the_pipeline_process_masks_secrets_registered_by_its_parent(capfd) -> None:
    """The pipeline runs in a spawned interpreter: a key known only to the parent's registry
    (--api_key_env's variable, a token given as a flag) is masked there as well."""
    import functools

    from tpo_data.pipeline import run_in_fresh_process

    key = "custom-endpoint-key-" + "9" * 12
    secrets.register(key)
    code = run_in_fresh_process(functools.partial(_log_a_secret_and_fail, key), False, Path("unused.yaml"))
    out = capfd.readouterr()
    assert code == 3 and "the key is ***" in out.out + out.err and key not in out.out + out.err

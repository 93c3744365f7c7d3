"""Human review round trip in Argilla: push, reviewers answer, pull, apply.

The tests marked ``argilla`` talk to a REAL Argilla 2.8 server; they are skipped
(with that reason) only when ARGILLA_API_URL is unset. Locally and in CI::

    bash scripts/argilla-server.sh start
    eval "$(bash scripts/argilla-server.sh env)"    # ARGILLA_API_URL, ARGILLA_API_KEY (an owner)
    pytest tests/test_argilla.py

Any Argilla 2.x the owner key can reach works too (Docker, Hugging Face Spaces):
every test uses fresh dataset and user names, so runs never collide. The
reviewer is a second user with the annotator role who logs in with their own
key and submits answers through the SDK, as the UI does. The unmarked tests
(curation rules and ``apply_reviews`` on hand-written reviews) need no server.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from pathlib import Path
from typing import Any

import datasets
import pytest
import yaml

from tpo_data import curation
from tpo_data.card import card_metadata
from tpo_data.cli import main as cli_main
from tpo_data.cli_argilla import reviews_path
from tpo_data.curation import (
    apply_reviews,
    connect,
    decide,
    default_dataset_name,
    flip_pair,
    majority_label,
    pull_reviews,
    push_for_review,
    review_fields,
)
from tpo_data.errors import TPODataError
from tpo_data.store import LocalStore

needs_server = pytest.mark.skipif(
    not os.environ.get("ARGILLA_API_URL"),
    reason="ARGILLA_API_URL is unset: start a real server with `bash scripts/argilla-server.sh start` and "
    '`eval "$(bash scripts/argilla-server.sh env)"`',
)
# |score_gap| order: q3 (0.05), q1, q6, q4, q2, q7, q5, q0.
GAPS = [0.8, 0.1, 0.5, 0.05, 0.3, 0.7, 0.2, 0.6]


def make_version(iteration: int = 1, prefix: str = "q") -> dict[str, datasets.Dataset]:
    """Synthetic ``pairs`` and ``candidates`` following docs/SCHEMA.md, one pair per instruction."""
    pairs: list[dict[str, Any]] = []
    candidates: list[dict[str, Any]] = []
    for i, gap in enumerate(GAPS):
        iid = f"{prefix}{i}"
        instruction = f"Explain idea {i} in one paragraph."
        category = ("math", "writing")[i % 2]
        sides = {}
        for side, score in (("chosen", 1.0 + gap), ("rejected", 1.0)):
            thought = "" if (i == 2 and side == "rejected") else f"{side} thought about idea {i}"
            response = f"{side} answer {i} " + "words " * (i + (3 if side == "chosen" else 1))
            sides[side] = {"thought": thought, "response": response, "score": score, "length": len(response)}
            candidates.append(
                {
                    "instruction_id": iid,
                    "instruction": instruction,
                    "category": category,
                    "sample_index": len(candidates) % 2,
                    "generation": f"{thought}\n## Response\n{response}",
                    "thought": thought,
                    "response": response,
                    "parsed": True,
                    "score": score,
                    "length": len(response),
                    "norm_score": score,
                    "iteration": iteration,
                }
            )
        c, r = sides["chosen"], sides["rejected"]
        pairs.append(
            {
                "prompt": [{"role": "user", "content": f"Think first.\n{instruction}"}],
                "chosen": [{"role": "assistant", "content": f"{c['thought']}\n## Response\n{c['response']}"}],
                "rejected": [{"role": "assistant", "content": f"{r['thought']}\n## Response\n{r['response']}"}],
                "instruction_id": iid,
                "instruction": instruction,
                "category": category,
                "chosen_thought": c["thought"],
                "chosen_response": c["response"],
                "rejected_thought": r["thought"],
                "rejected_response": r["response"],
                "chosen_score": c["score"],
                "rejected_score": r["score"],
                "chosen_length": c["length"],
                "rejected_length": r["length"],
                "score_gap": gap,
                "rho": 0.0,
                "iteration": iteration,
            }
        )
    return {"pairs": datasets.Dataset.from_list(pairs), "candidates": datasets.Dataset.from_list(candidates)}


def make_store(base: Path, versions: tuple[tuple[str, str], ...] = (("iter-1", "q"),)) -> LocalStore:
    """Versions (name, id prefix) in a store under ``base`` with a unique folder name.

    Dataset names derive from the folder name, and the server outlives test runs.
    """
    store = LocalStore(base / f"store-{uuid.uuid4().hex[:8]}")
    for version, prefix in versions:
        manifest = {"iteration": 1, "parent_model": "tiny-policy", "recipe": {"judge": "rm"}, "seed": 0}
        header = yaml.safe_dump(card_metadata(), sort_keys=False)  # declares the configs for load_dataset
        store.write_version(version, make_version(1, prefix), manifest, f"---\n{header}---\n# {version}\n")
    return store


def fresh_datasets_cache(mp: pytest.MonkeyPatch, folder: Path) -> None:
    # LocalStore.load goes through load_dataset, whose cache is keyed by the version
    # folder's name only: a second store with an "iter-1" would read the first one's rows.
    mp.setattr(datasets.config, "HF_DATASETS_CACHE", folder)


@pytest.fixture(autouse=True)
def _own_datasets_cache(tmp_path, monkeypatch):
    fresh_datasets_cache(monkeypatch, tmp_path / "datasets-cache")


def rows_by_id(ds: datasets.Dataset) -> dict[str, dict[str, Any]]:
    return {row["instruction_id"]: row for row in ds}


# ---------------------------------------------------------------------------
# Curation rules and apply_reviews (no server)
# ---------------------------------------------------------------------------


def answer(label: str, flags: list[str] | None = None, reviewer: str = "ann") -> dict[str, Any]:
    return {"reviewer": reviewer, "label": label, "flags": flags or [], "note": None}


def test_majority_and_flags():
    assert majority_label([answer("no")]) == "no"
    assert majority_label([answer("yes"), answer("no", reviewer="b")]) == "tie"
    assert majority_label([answer("yes"), answer("no", reviewer="b"), answer("yes", reviewer="c")]) == "yes"
    assert decide([answer("yes"), answer("yes", ["judge_gamed"], reviewer="b")]) == "flagged"
    assert decide([answer("tie")]) == "tie"


def test_flip_pair_swaps_every_side_column():
    row = make_version()["pairs"][1]
    flipped = flip_pair(row)
    for a, b in (("chosen", "rejected"), ("chosen_thought", "rejected_thought"),
                 ("chosen_response", "rejected_response"), ("chosen_score", "rejected_score"),
                 ("chosen_length", "rejected_length")):
        assert flipped[a] == row[b] and flipped[b] == row[a]
    assert flipped["score_gap"] == -row["score_gap"]
    assert flipped["prompt"] == row["prompt"] and flipped["instruction_id"] == row["instruction_id"]


def test_apply_offline_counts_card_and_candidates(tmp_path):
    store = make_store(tmp_path)
    reviews = [
        {"instruction_id": "q0", "responses": [answer("yes")]},
        {"instruction_id": "q1", "responses": [answer("no")]},
        {"instruction_id": "q2", "responses": [answer("tie")]},
        {"instruction_id": "q3", "responses": [answer("yes", ["harmful"])]},
    ]
    new = apply_reviews(store, "iter-1", reviews)
    assert new == "iter-1-curated"
    curated = rows_by_id(store.load(new))
    original = rows_by_id(store.load("iter-1"))
    assert set(curated) == {"q0", "q1", "q4", "q5", "q6", "q7"}
    assert curated["q1"]["chosen"] == original["q1"]["rejected"]
    assert curated["q0"] == original["q0"]
    c = store.manifest(new)["curation"]
    assert (c["reviewed"], c["kept_yes"], c["flipped_no"], c["dropped_tie"], c["dropped_flagged"]) == (4, 1, 1, 1, 1)
    assert c["agreement"] == 0.5 and c["pairs_out"] == 6 and c["unreviewed_kept"] == 4
    assert store.manifest(new)["parent_version"] == "iter-1"
    assert store.load(new, "candidates").to_list() == store.load("iter-1", "candidates").to_list()
    with pytest.raises(TPODataError, match="not in version iter-1"):
        apply_reviews(store, "iter-1", [{"instruction_id": "zz", "responses": [answer("no")]}], new_version="x")
    with pytest.raises(TPODataError, match="already exists(.|\n)*pass another --new-version"):
        apply_reviews(store, "iter-1", reviews)
    everything_tied = [{"instruction_id": f"q{i}", "responses": [answer("tie")]} for i in range(len(GAPS))]
    with pytest.raises(TPODataError, match="drop all 8 pairs"):
        apply_reviews(store, "iter-1", everything_tied, new_version="iter-1-empty")
    assert "iter-1-empty" not in [m["version"] for m in store.versions()]


# ---------------------------------------------------------------------------
# Against the real server
# ---------------------------------------------------------------------------


def test_apply_refuses_reviews_of_another_copy_of_the_version(tmp_path, capsys):
    """A reviews file pulled before the version was written again (or in another store) has the
    same version name and ids, but its answers are about other pairs."""
    from tpo_data.files import sha256_file
    from tpo_data.store import MANIFEST

    store = make_store(tmp_path)
    root = str(store.root)
    path = reviews_path(root, "iter-1")
    path.parent.mkdir(parents=True)
    reviews = [{"instruction_id": "q0", "responses": [answer("no")]}]
    path.write_text(json.dumps({"version": "iter-1", "manifest_sha256": "0" * 64, "reviews": reviews}))
    assert cli_main(["argilla", "apply", "iter-1", "--store", root]) == 2
    err = capsys.readouterr().err
    assert "holds reviews of another iter-1" in err and f"tpo-data argilla pull iter-1 --store {root}" in err
    assert [m["version"] for m in store.versions()] == ["iter-1"]  # nothing written
    digest = sha256_file(store.path("iter-1") / MANIFEST)
    path.write_text(json.dumps({"version": "iter-1", "manifest_sha256": digest, "reviews": reviews}))
    assert cli_main(["argilla", "apply", "iter-1", "--store", root]) == 0
    assert store.manifest("iter-1-curated")["curation"]["flipped_no"] == 1


@pytest.fixture(scope="module")
def owner():
    return connect()


@pytest.fixture(scope="module")
def workspace(owner) -> str:
    import argilla as rg

    if not len(owner.workspaces):
        rg.Workspace("tpo-data-tests", client=owner).create()
    return owner.workspaces.default.name


def new_reviewer(owner, workspace: str):
    """A fresh annotator in ``workspace`` and an SDK client logged in with their own key."""
    import argilla as rg

    user = rg.User(username=f"rev-{uuid.uuid4().hex[:8]}", password=uuid.uuid4().hex, role="annotator",
                   client=owner).create()
    owner.workspaces(workspace).add_user(user)
    # The SDK's user model drops the key the server returns, so read it from the raw answer.
    key = owner.http_client.get(f"/api/v1/users/{user.id}").json()["api_key"]
    reviewer = rg.Argilla(api_url=owner.api_url, api_key=key, retries=0)
    rg.Argilla._set_default(owner)  # every new client makes itself the SDK-wide default
    return reviewer


def submit(client, record, label: str, flags: list[str] | None = None, note: str | None = None,
           status: str = "submitted") -> None:
    """Answer ``record`` as the user of ``client`` (POST /api/v1/records/{id}/responses, like the UI)."""
    import argilla as rg
    from argilla.responses import UserResponse

    uid = client.me.id
    answers = [rg.Response(curation.LABEL_QUESTION, label, user_id=uid, status=status)]
    if flags:
        answers.append(rg.Response(curation.FLAGS_QUESTION, flags, user_id=uid, status=status))
    if note:
        answers.append(rg.Response(curation.NOTE_QUESTION, note, user_id=uid, status=status))
    client.api.records.create_record_response(record._server_id, UserResponse(answers, _record=record).api_model())


def records_by_id(dataset) -> dict[str, Any]:
    return {r.id: r for r in dataset.records(with_responses=True)}


@pytest.fixture(scope="module")
def reviewed(owner, workspace, tmp_path_factory):
    """iter-1 pushed, answered by an annotator (and the owner on two pairs), pushed again, q6 deleted."""
    with pytest.MonkeyPatch.context() as mp:
        fresh_datasets_cache(mp, tmp_path_factory.mktemp("datasets-cache"))
        return _reviewed(owner, workspace, make_store(tmp_path_factory.mktemp("reviewed")))


def _reviewed(owner, workspace, store):
    dataset = push_for_review(store, "iter-1", owner, workspace=workspace)
    reviewer = new_reviewer(owner, workspace)
    records = records_by_id(dataset)
    submit(reviewer, records["q0"], "yes")
    submit(reviewer, records["q1"], "no", note="the rejected one answers the question")
    submit(reviewer, records["q2"], "tie")
    submit(reviewer, records["q3"], "yes", flags=["harmful"])
    submit(reviewer, records["q4"], "no")
    submit(owner, records["q4"], "yes")  # split vote: tie
    submit(reviewer, records["q5"], "yes")
    submit(owner, records["q5"], "yes")
    submit(reviewer, records["q7"], "no", status="draft")  # drafts do not count
    push_for_review(store, "iter-1", owner, workspace=workspace)  # upserts: no duplicates, answers kept
    dataset.records.delete([records["q6"]])
    return store, dataset, reviewer


def test_default_review_dataset_is_one_versions(tmp_path):
    def store_of(run):
        store = LocalStore(tmp_path / run / "store")
        manifest = {"iteration": 1, "parent_model": run, "recipe": {}, "seed": 0}
        store.write_version("iter-1", make_version(1, "q"), manifest, "# iter-1\n")
        return store

    a, b = store_of("run-a"), store_of("run-b")
    name = default_dataset_name(a, "iter-1")
    assert name.startswith("tpo-run-a-iter-1-") and name == default_dataset_name(a, "iter-1")
    # Every run's store folder is "store": the names still differ, by run and by content.
    assert default_dataset_name(b, "iter-1").startswith("tpo-run-b-iter-1-")
    twin = LocalStore(tmp_path / "elsewhere" / "run-a" / "store")
    twin.write_version("iter-1", make_version(1, "q"), {"iteration": 1, "parent_model": "x", "recipe": {}, "seed": 0},
                       "# iter-1\n")
    assert default_dataset_name(twin, "iter-1") != name


def test_review_shows_the_whole_output_of_a_parse_failure():
    row = make_version(1, "q")["pairs"][0]
    raw = "I think the answer is four, and I never wrote the separator."
    row.update(rejected=[{"role": "assistant", "content": raw}], rejected_thought="", rejected_response="")
    fields = review_fields(row)
    assert fields["rejected_thought"] is None
    assert fields["rejected_response"].startswith("*Parse failure") and fields["rejected_response"].endswith(raw)
    # A parsed side shows its thought and response as they are.
    assert (fields["chosen_thought"], fields["chosen_response"]) == (row["chosen_thought"], row["chosen_response"])
    assert fields["instruction"] == row["instruction"]


@pytest.mark.argilla
@needs_server
def test_push_creates_settings_records_and_suggestion(reviewed):
    store, dataset, _ = reviewed
    assert dataset.name == default_dataset_name(store, "iter-1")
    titles = {f.name: f.title for f in dataset.settings.fields}
    assert "hidden from the judge" in titles["chosen_thought"] and "hidden from the judge" in titles["rejected_thought"]
    assert all(f.use_markdown for f in dataset.settings.fields)
    label = dataset.settings.questions["label"]
    assert label.title == "Is the chosen response better?" and label.labels == ["yes", "no", "tie"] and label.required
    metadata = {m.name for m in dataset.settings.metadata}
    assert metadata == {"category", "score_gap", "chosen_length", "rejected_length", "rho"}
    records = records_by_id(dataset)
    # Pushed twice, minus the deleted q6: no duplicates, and the answers given in between are still there.
    assert sorted(records) == ["q0", "q1", "q2", "q3", "q4", "q5", "q7"]
    assert [r.value for r in records["q0"].responses["label"]] == ["yes"]
    q1 = records["q1"]
    assert q1.suggestions["label"].value == "yes"
    assert q1.metadata["category"] == "writing" and q1.metadata["score_gap"] == pytest.approx(0.1)
    assert q1.fields["chosen_thought"] == "chosen thought about idea 1"
    # An empty thought is an absent optional field.
    assert "rejected_thought" not in records["q2"].fields


@pytest.mark.argilla
@needs_server
def test_pull_reviews(reviewed, owner):
    store, _, reviewer = reviewed
    reviews = pull_reviews(store, "iter-1", owner)
    assert reviews.counts == {"pairs": 8, "in_argilla": 7, "reviewed": 6, "not_reviewed": 1, "missing": 1}
    assert reviews.missing_ids == ["q6"]
    got = {r["instruction_id"]: r["responses"] for r in reviews}
    assert sorted(got) == ["q0", "q1", "q2", "q3", "q4", "q5"]
    name = reviewer.me.username
    note = "the rejected one answers the question"
    assert got["q1"] == [{"reviewer": name, "label": "no", "flags": [], "note": note}]
    assert got["q3"][0]["flags"] == ["harmful"]
    assert sorted(a["reviewer"] for a in got["q4"]) == sorted([name, owner.me.username])


@pytest.mark.argilla
@needs_server
@pytest.mark.parametrize("on_no", ["flip", "drop"])
def test_apply_pulled_reviews(reviewed, owner, on_no):
    store, _, _ = reviewed
    reviews = pull_reviews(store, "iter-1", owner)
    new = apply_reviews(store, "iter-1", reviews, on_no=on_no, new_version=f"iter-1-{on_no}")
    original, curated = rows_by_id(store.load("iter-1")), rows_by_id(store.load(new))
    kept = {"q0", "q5", "q6", "q7"} | ({"q1"} if on_no == "flip" else set())
    assert set(curated) == kept
    for iid in kept - {"q1"}:
        assert curated[iid] == original[iid]
    if on_no == "flip":
        q1, old = curated["q1"], original["q1"]
        assert (q1["chosen"], q1["rejected"]) == (old["rejected"], old["chosen"])
        assert (q1["chosen_thought"], q1["chosen_response"]) == (old["rejected_thought"], old["rejected_response"])
        assert q1["score_gap"] == -old["score_gap"]
    manifest = store.manifest(new)
    c = manifest["curation"]
    assert c["reviewed"] == 6 and c["unreviewed_kept"] == 2 and c["agreement"] == 0.5
    assert (c["kept_yes"], c["dropped_tie"], c["dropped_flagged"]) == (2, 2, 1)
    assert (c["flipped_no"], c["dropped_no"]) == ((1, 0) if on_no == "flip" else (0, 1))
    assert manifest["row_counts"] == {"pairs": len(kept), "candidates": 16}
    assert manifest["parent_version"] == "iter-1" and manifest["iteration"] == 1
    card_text = (store.path(new) / "README.md").read_text()
    assert "50.0%" in card_text and f"| pairs out | {len(kept)} |" in card_text
    assert store.load(new, "candidates").to_list() == store.load("iter-1", "candidates").to_list()


@pytest.mark.argilla
@needs_server
def test_cli_round_trip_keeps_key_out_of_files(owner, workspace, tmp_path, capsys):
    store = make_store(tmp_path)
    root = str(store.root)
    assert cli_main(["argilla", "push", "iter-1", "--store", root, "--workspace", workspace,
                     "--sample", "3"]) == 0
    dataset = owner.datasets(default_dataset_name(store, "iter-1"), workspace=workspace)
    records = records_by_id(dataset)
    assert sorted(records) == ["q1", "q3", "q6"]  # the three smallest |score_gap|
    submit(new_reviewer(owner, workspace), records["q3"], "no")
    assert cli_main(["argilla", "pull", "iter-1", "--store", root]) == 0
    pulled = json.loads(reviews_path(root, "iter-1").read_text())
    assert pulled["counts"]["reviewed"] == 1 and pulled["counts"]["missing"] == 5
    assert cli_main(["argilla", "apply", "iter-1", "--store", root, "--on_no", "drop"]) == 0
    assert "q3" not in rows_by_id(store.load("iter-1-curated"))
    out = capsys.readouterr()
    key = os.environ["ARGILLA_API_KEY"]
    assert key not in out.out + out.err
    for path in Path(root).rglob("*"):
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path


@pytest.mark.argilla
@needs_server
def test_wrong_key_is_a_clear_error_without_the_key(monkeypatch, capsys, tmp_path):
    wrong = f"wrong-key-{uuid.uuid4().hex}"
    monkeypatch.setenv("ARGILLA_API_KEY", wrong)
    with pytest.raises(TPODataError, match="refused the API key") as err:
        connect()
    assert wrong not in str(err.value) and "401" in str(err.value)
    store = make_store(tmp_path)
    assert cli_main(["argilla", "push", "iter-1", "--store", str(store.root)]) == 2
    out = capsys.readouterr()
    assert "refused the API key" in out.err and wrong not in out.out + out.err


@pytest.mark.argilla
@needs_server
def test_unreachable_server_is_a_clear_error(monkeypatch, capsys, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    monkeypatch.setenv("ARGILLA_API_URL", f"http://127.0.0.1:{port}")
    with pytest.raises(TPODataError, match="cannot reach Argilla") as err:
        connect()
    assert "argilla-server.sh start" in err.value.fix
    store = make_store(tmp_path)
    assert cli_main(["argilla", "push", "iter-1", "--store", str(store.root)]) == 2
    assert "cannot reach Argilla" in capsys.readouterr().err


@pytest.mark.argilla
@needs_server
def test_missing_version_and_unset_env(owner, tmp_path, monkeypatch):
    store = make_store(tmp_path)
    with pytest.raises(TPODataError, match="version 'nope' not found"):
        push_for_review(store, "nope", owner)
    monkeypatch.delenv("ARGILLA_API_KEY")
    with pytest.raises(TPODataError, match="ARGILLA_API_KEY not set"):
        connect()


@pytest.mark.argilla
@needs_server
def test_existing_dataset_with_other_settings(owner, workspace, tmp_path):
    import argilla as rg

    store = make_store(tmp_path)
    name = default_dataset_name(store, "iter-1")
    other = rg.Settings(
        fields=[rg.TextField("instruction", client=owner)],
        questions=[rg.LabelQuestion("label", labels=["yes", "no"], client=owner)],
    )
    rg.Dataset(name, workspace=workspace, settings=other, client=owner).create()
    with pytest.raises(TPODataError, match="exists with other settings") as err:
        push_for_review(store, "iter-1", owner, workspace=workspace)
    message = str(err.value)
    assert "question 'label' has labels ['yes', 'no'], expected ['yes', 'no', 'tie']" in message
    assert "field 'chosen_response' is missing" in message and "--dataset_name" in err.value.fix
    # A new name works.
    assert push_for_review(store, "iter-1", owner, workspace=workspace, dataset_name=f"{name}-b").name == f"{name}-b"


@pytest.mark.argilla
@needs_server
def test_pull_refuses_records_of_another_version(owner, workspace, tmp_path):
    store = make_store(tmp_path, (("iter-1", "q"), ("iter-2", "p")))
    dataset = push_for_review(store, "iter-1", owner, workspace=workspace)
    with pytest.raises(TPODataError, match="not pairs of version iter-2"):
        pull_reviews(store, "iter-2", owner, dataset.name)
    with pytest.raises(TPODataError, match="no Argilla dataset named"):
        pull_reviews(store, "iter-2", owner)
    # Same ids, one pair flipped: the reviewer of q0 saw iter-1's pair, not iter-1-curated's.
    curated = apply_reviews(store, "iter-1", [{"instruction_id": "q0", "responses": [answer("no")]}])
    with pytest.raises(TPODataError, match=r"1 record\(s\) that are not pairs of version iter-1-curated "
                                           r"\(for example q0: another id, or the same id showing another pair"):
        pull_reviews(store, curated, owner, dataset.name)
    # Records without answers may show another pair (an upsert is how a push updates them) ...
    push_for_review(store, curated, owner, workspace=workspace, dataset_name=dataset.name)
    flipped = rows_by_id(store.load(curated, "pairs"))["q0"]["chosen_response"]
    assert records_by_id(dataset)["q0"].fields["chosen_response"] == flipped
    # ... answered ones may not: Argilla would keep the answer beside a pair its reviewer never saw.
    submit(new_reviewer(owner, workspace), records_by_id(dataset)["q0"], "no")
    with pytest.raises(TPODataError, match=r"answered records \(submitted, draft or discarded\) that show "
                                           r"other pairs under the same ids \(1, for example q0\)"):
        push_for_review(store, "iter-1", owner, workspace=workspace, dataset_name=dataset.name)
    assert records_by_id(dataset)["q0"].fields["chosen_response"] == flipped

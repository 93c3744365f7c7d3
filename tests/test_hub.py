"""Hub publishing against tests/hub_standin.py (offline) and, opt-in, against the real Hub.

The publishing code and the ``datasets``/``huggingface_hub`` clients run unchanged
in subprocesses, because HF_ENDPOINT, HF_TOKEN and HF_HUB_DISABLE_XET are read
at import time. Every subprocess output is checked for the token as it arrives,
and the last test greps every file written by the module.

Live tests run only when HF_TOKEN and TPO_LIVE_HUB_REPO (a scratch dataset repo
you own) are set and huggingface.co is reachable; they publish under unique tags
and delete those tags afterwards.
"""

from __future__ import annotations

import json
import os
import secrets as pysecrets
import shutil
import socket
import string
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hub_standin import HubStandin
from test_store import make_iteration, tree_hashes, write_test_iteration

from tpo_data.store import MANIFEST, LocalStore

TOKEN = "hf_" + "".join(pysecrets.choice(string.ascii_letters + string.digits) for _ in range(34))
USED_TOKENS: set[str] = {TOKEN}  # plus the real one when live tests run
CAPTURED: list[str] = []  # every stdout/stderr of every client subprocess
WRITTEN: list[Path] = []  # every folder this module writes into

PUBLISH = """
import json, logging, sys
from tpo_data.errors import TPODataError
from tpo_data.hub import publish_version
from tpo_data.secrets import scrub_log_records
from tpo_data.store import LocalStore

scrub_log_records()
logging.basicConfig(level=logging.INFO, handlers=[logging.StreamHandler()])
a = json.loads(sys.argv[1])
try:
    sha = publish_version(LocalStore(a["store"]), a["version"], a["repo"], tag=a.get("tag"),
                          max_retries=a.get("max_retries", 5), backoff=0.01)
    print(json.dumps({"ok": True, "commit": sha}))
except TPODataError as err:
    print(json.dumps({"ok": False, "error": str(err)}))
"""

LOAD = """
import hashlib, json, sys
import datasets
from huggingface_hub import HfApi

a = json.loads(sys.argv[1])
api = HfApi()
out = {}
for tag in a["tags"]:
    rows = {
        c: datasets.load_dataset(a["repo"], c, revision=tag, split="train").to_list()
        for c in ("pairs", "candidates")
    }
    path = api.hf_hub_download(a["repo"], "manifest.json", repo_type="dataset", revision=tag)
    manifest = json.load(open(path))
    hashes = {}
    for rel in [*manifest["files"], "manifest.json"]:
        path = api.hf_hub_download(a["repo"], rel, repo_type="dataset", revision=tag)
        hashes[rel] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    files = sorted(api.list_repo_files(a["repo"], repo_type="dataset", revision=tag))
    commit = api.dataset_info(a["repo"], revision=tag).sha
    out[tag] = {"rows": rows, "hashes": hashes, "files": files, "commit": commit}
json.dump(out, open(a["out"], "w"), default=str)
"""

DELETE_TAGS = """
import json, sys
from huggingface_hub import HfApi
a = json.loads(sys.argv[1])
for tag in a["tags"]:
    try:
        HfApi().delete_tag(a["repo"], tag=tag, repo_type="dataset")
    except Exception as err:
        print("could not delete", tag, type(err).__name__)
"""


@dataclass
class Backend:
    """Where the clients publish: the stand-in or the real Hub."""

    name: str
    env: dict[str, str]
    hub: HubStandin | None = None
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    live_repo: str | None = None

    def repo(self, name: str) -> str:
        return self.live_repo or f"stand-in-user/{name}"

    def tag(self, version: str) -> str:
        # The live scratch repo outlives test runs, so tags there must be unique.
        return f"{version}-{self.run_id}" if self.live_repo else version


def client_env(tmp: Path, endpoint: str | None, token: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_"))}
    env.update(
        HF_TOKEN=token,
        HF_HOME=str(tmp / "hf_home"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_DATASETS_DISABLE_PROGRESS_BARS="1",
    )
    if endpoint:
        # The stand-in speaks the LFS batch protocol, not Xet; the real Hub gets the default.
        env.update(HF_ENDPOINT=endpoint, HF_HUB_DISABLE_XET="1")
    return env


def run_client(
    backend: Backend,
    args: list[str],
    payload: dict[str, Any] | None = None,
    *,
    env: dict[str, str] | None = None,
    timeout: float = 180,
) -> subprocess.CompletedProcess[str]:
    """Run ``python <args> [payload]`` with the backend's env; no token may be in its output."""
    command = [sys.executable, *args, *([json.dumps(payload)] if payload is not None else [])]
    env = backend.env if env is None else env
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    CAPTURED.extend([result.stdout, result.stderr])
    token = backend.env["HF_TOKEN"]
    assert token not in result.stdout and token not in result.stderr, (
        "token leaked into client output"
    )
    assert result.returncode in (0, 2), f"client crashed:\n{result.stderr[-4000:]}"
    return result


def publish(
    backend: Backend, store: LocalStore, version: str, repo: str, **options: Any
) -> dict[str, Any]:
    result = run_client(
        backend,
        ["-c", PUBLISH],
        {"store": str(store.root), "version": version, "repo": repo, **options},
    )
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    outcome["log"] = result.stderr
    return outcome


def live_hub_reachable() -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


LIVE_REASON = "live Hub tests need HF_TOKEN, TPO_LIVE_HUB_REPO (a scratch dataset repo) and network"
LIVE_ENABLED = bool(os.environ.get("HF_TOKEN") and os.environ.get("TPO_LIVE_HUB_REPO"))


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("hub")
    WRITTEN.append(tmp)
    return tmp


@pytest.fixture(scope="module")
def hub(module_tmp: Path) -> Iterator[HubStandin]:
    with HubStandin(module_tmp / "standin-storage") as server:
        yield server


@pytest.fixture(scope="module")
def store(module_tmp: Path) -> LocalStore:
    local = LocalStore(module_tmp / "store" / "tpo")
    write_test_iteration(local, 1)
    write_test_iteration(local, 2)
    return local


@pytest.fixture(scope="module")
def standin(hub: HubStandin, module_tmp: Path) -> Backend:
    return Backend("standin", client_env(module_tmp, hub.url, TOKEN), hub=hub)


@pytest.fixture(
    params=[
        "standin",
        pytest.param("live", marks=pytest.mark.skipif(not LIVE_ENABLED, reason=LIVE_REASON)),
    ]
)
def backend(request: pytest.FixtureRequest, module_tmp: Path) -> Backend:
    if request.param == "standin":
        return request.getfixturevalue("standin")
    if not live_hub_reachable():
        pytest.skip(LIVE_REASON)
    USED_TOKENS.add(os.environ["HF_TOKEN"])
    return Backend(
        "live",
        client_env(module_tmp / "live", None, os.environ["HF_TOKEN"]),
        live_repo=os.environ["TPO_LIVE_HUB_REPO"],
    )


@pytest.fixture
def fresh_faults(hub: HubStandin) -> Iterator[HubStandin]:
    hub.clear_faults()
    yield hub
    assert hub.pending_faults() == {}, "some injected faults were never reached"
    assert hub.state()["unhandled"] == []


def canonical(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return json.loads(json.dumps(rows, default=str))


# -- acceptance -------------------------------------------------------------------------


def test_two_iterations_round_trip(backend: Backend, store: LocalStore, module_tmp: Path) -> None:
    repo = backend.repo("tpo-roundtrip")
    tags = {version: backend.tag(version) for version in ("iter-1", "iter-2")}
    commits = {}
    try:
        for version, tag in tags.items():
            result = run_client(
                backend,
                [
                    "-m",
                    "tpo_data.cli",
                    "publish",
                    version,
                    "--store",
                    str(store.root),
                    "--repo",
                    repo,
                    "--tag",
                    tag,
                ],
            )
            assert result.returncode == 0, result.stderr
            commits[version] = result.stdout.split("commit ")[1].split(",")[0]
        assert commits["iter-1"] != commits["iter-2"]

        out = module_tmp / f"loaded-{backend.name}.json"
        run_client(
            backend, ["-c", LOAD], {"repo": repo, "tags": list(tags.values()), "out": str(out)}
        )
        loaded = json.loads(out.read_text())
        cache = str(module_tmp / "datasets-cache")
        for version, tag in tags.items():
            got = loaded[tag]
            assert (
                got["commit"] == commits[version]
            )  # the tag is on the returned commit, not on main
            originals = dict(
                zip(
                    ("pairs", "candidates"), make_iteration(int(version.split("-")[1])), strict=True
                )
            )
            for config in ("pairs", "candidates"):
                assert got["rows"][config] == canonical(originals[config].to_list())
                assert got["rows"][config] == canonical(
                    store.load(version, config, cache_dir=cache).to_list()
                )
            manifest = store.manifest(version)
            local_hashes = tree_hashes(store.path(version))
            assert {rel: got["hashes"][rel] for rel in manifest["files"]} == {
                rel: info["sha256"] for rel, info in manifest["files"].items()
            }
            assert got["hashes"] == local_hashes  # byte-identical, manifest.json included
            assert sorted(set(got["files"]) - {".gitattributes"}) == sorted(local_hashes)

        listed = run_client(
            backend, ["-m", "tpo_data.cli", "versions", "--repo", repo, "--json"]
        )
        versions = {m["tag"]: m for m in json.loads(listed.stdout)}
        for version, tag in tags.items():
            assert versions[tag]["commit"] == commits[version]
            assert versions[tag]["iteration"] == int(version.split("-")[1])
            assert versions[tag]["manifest_sha256"] == tree_hashes(store.path(version))[MANIFEST]
        assert versions[tags["iter-2"]]["parent_version"] == "iter-1"
        table = run_client(backend, ["-m", "tpo_data.cli", "versions", "--repo", repo]).stdout
        assert tags["iter-1"] in table and commits["iter-2"][:8] in table
        shown = run_client(
            backend, ["-m", "tpo_data.cli", "show", tags["iter-2"], "--repo", repo]
        ).stdout
        assert "parse_rate" in shown and "outputs/models/iter-1" in shown
    finally:
        if backend.live_repo:
            run_client(backend, ["-c", DELETE_TAGS], {"repo": repo, "tags": list(tags.values())})

    if backend.hub is not None:
        state = backend.hub.repo(repo)
        assert state.tags == {"iter-1": commits["iter-1"], "iter-2": commits["iter-2"]}
        assert state.branches["main"] == commits["iter-2"]
        assert (
            backend.hub.history(repo)[1] == commits["iter-1"]
        )  # one commit per iteration, nothing else
        assert backend.hub.state()["unhandled"] == []


def test_existing_tag_is_refused(backend: Backend, store: LocalStore) -> None:
    repo = backend.repo("tpo-existing-tag")
    tag, rerun = backend.tag("iter-1"), backend.tag("iter-1") + "-rerun"
    try:
        first = publish(backend, store, "iter-1", repo, tag=tag)
        assert first["ok"], first
        again = publish(backend, store, "iter-1", repo, tag=tag)
        assert not again["ok"]
        assert (
            f"tag {tag} already exists" in again["error"] and f"--tag {tag}-rerun" in again["error"]
        )
        assert "How to fix" in again["error"]
        # An explicit new name publishes; the identical files reuse the existing commit.
        renamed = publish(backend, store, "iter-1", repo, tag=rerun)
        assert renamed["ok"] and renamed["commit"] == first["commit"]
    finally:
        if backend.live_repo:
            run_client(backend, ["-c", DELETE_TAGS], {"repo": repo, "tags": [tag, rerun]})
    if backend.hub is not None:
        state = backend.hub.repo(repo)
        assert state.tags == {tag: first["commit"], rerun: first["commit"]}
        assert len(backend.hub.history(repo)) == 2  # initial commit + iter-1 only


# -- faults (stand-in only) -------------------------------------------------------------------


def assert_local_intact(store: LocalStore, version: str, before: dict[str, str]) -> None:
    store.verify(version)
    assert tree_hashes(store.path(version)) == before


def test_transient_commit_errors_are_retried(
    standin: Backend, fresh_faults: HubStandin, store: LocalStore
) -> None:
    repo = standin.repo("tpo-transient")
    fresh_faults.add_faults("commit", "503", "drop", "502")
    outcome = publish(standin, store, "iter-1", repo)
    assert outcome["ok"], outcome
    assert outcome["log"].count("transient error, retrying") == 3
    history = fresh_faults.history(repo)
    assert len(history) == 2 and history[0] == outcome["commit"]
    assert fresh_faults.repo(repo).tags == {"iter-1": outcome["commit"]}


def test_lost_commit_response_does_not_duplicate(
    standin: Backend, fresh_faults: HubStandin, store: LocalStore
) -> None:
    """The commit lands but its answer is lost: the retry tags that commit, pushes no second."""
    repo = standin.repo("tpo-lost-response")
    fresh_faults.add_faults("commit", "drop-after")
    outcome = publish(standin, store, "iter-1", repo)
    assert outcome["ok"], outcome
    history = fresh_faults.history(repo)
    assert len(history) == 2 and history[0] == outcome["commit"]
    assert fresh_faults.repo(repo).tags == {"iter-1": outcome["commit"]}


def test_stale_parent_412_is_retried_on_fresh_head(
    standin: Backend, fresh_faults: HubStandin, store: LocalStore
) -> None:
    repo = standin.repo("tpo-stale-parent")
    fresh_faults.add_faults("commit", "stale-parent")
    outcome = publish(standin, store, "iter-2", repo)
    assert outcome["ok"], outcome
    assert "HTTP 412" in outcome["log"]
    ours, foreign, _initial = fresh_faults.history(repo)
    assert (
        ours == outcome["commit"]
        and fresh_faults.repo(repo).commits[foreign].title == "Foreign commit"
    )
    # The tag holds exactly the version: the foreign file is gone from it, kept in history.
    tagged = fresh_faults.repo(repo).commits[fresh_faults.repo(repo).tags["iter-2"]]
    assert set(tagged.files) - {".gitattributes"} == set(tree_hashes(store.path("iter-2")))
    assert {p: e.sha256 for p, e in tagged.files.items() if p != ".gitattributes"} == tree_hashes(
        store.path("iter-2")
    )


def test_persistent_failure_leaves_no_tag_and_no_token(
    standin: Backend, fresh_faults: HubStandin, store: LocalStore
) -> None:
    repo = standin.repo("tpo-persistent-5xx")
    before = tree_hashes(store.path("iter-1"))
    # The server echoes the Authorization header in its error (as a broken proxy might).
    fresh_faults.add_faults("commit", *["503-echo-auth"] * 3)
    outcome = publish(standin, store, "iter-1", repo, max_retries=2)
    assert not outcome["ok"]
    error = outcome["error"]
    assert "could not commit to stand-in-user/tpo-persistent-5xx (after 3 attempts)" in error
    assert "503" in error and "nothing was tagged and the local version is intact" in error
    assert "Bearer ***" in error and TOKEN not in error + outcome["log"]
    state = fresh_faults.repo(repo)
    assert (
        state.tags == {} and len(fresh_faults.history(repo)) == 1
    )  # only the repo's initial commit
    assert_local_intact(store, "iter-1", before)
    # Once the Hub recovers, the same command succeeds.
    assert publish(standin, store, "iter-1", repo)["ok"]


def test_dropped_connections_exhausted(
    standin: Backend, fresh_faults: HubStandin, store: LocalStore
) -> None:
    repo = standin.repo("tpo-dropped")
    before = tree_hashes(store.path("iter-2"))
    fresh_faults.add_faults("commit", "drop", "drop")
    outcome = publish(standin, store, "iter-2", repo, max_retries=1)
    assert (
        not outcome["ok"]
        and "RemoteProtocolError" in outcome["error"]
        and "How to fix" in outcome["error"]
    )
    assert fresh_faults.repo(repo).tags == {} and len(fresh_faults.history(repo)) == 1
    assert_local_intact(store, "iter-2", before)


def test_tag_failures(standin: Backend, fresh_faults: HubStandin, store: LocalStore) -> None:
    repo = standin.repo("tpo-tag-faults")
    # A lost answer to the tag request: the retry sees 409 on our own commit and accepts it.
    fresh_faults.add_faults("tag", "drop-after")
    first = publish(standin, store, "iter-1", repo)
    assert first["ok"], first
    assert fresh_faults.repo(repo).tags == {"iter-1": first["commit"]}

    # The tag keeps failing: the commit is on main, untagged, and the message says to re-run.
    fresh_faults.add_faults("tag", "500", "500")
    failed = publish(standin, store, "iter-2", repo, max_retries=1)
    assert not failed["ok"] and "could not create tag iter-2" in failed["error"]
    assert "committed on main but not tagged" in failed["error"]
    head = fresh_faults.repo(repo).branches["main"]
    assert "iter-2" not in fresh_faults.repo(repo).tags
    rerun = publish(standin, store, "iter-2", repo)
    assert rerun["ok"] and rerun["commit"] == head  # the upload is reused, no new commit
    assert fresh_faults.repo(repo).tags["iter-2"] == head

    # Someone else creates the tag between the check and our tag request.
    fresh_faults.add_faults("tag", "tag-race")
    raced = publish(standin, store, "iter-2", repo, tag="iter-2-b")
    assert (
        not raced["ok"]
        and "was created in" in raced["error"]
        and "by someone else" in raced["error"]
    )
    assert fresh_faults.repo(repo).tags["iter-2-b"] != head


def test_tag_lands_only_on_a_commit_holding_the_version(
    standin: Backend, fresh_faults: HubStandin, store: LocalStore
) -> None:
    """An all-unchanged commit is answered with main's head, whoever put it there."""
    repo = standin.repo("tpo-main-moved")
    first = publish(standin, store, "iter-1", repo)
    assert first["ok"], first
    # Publishing the same files again (as after a lost answer) while another client pushes.
    fresh_faults.add_faults("preupload", "foreign-after")
    moved = publish(standin, store, "iter-1", repo, tag="iter-1-b")
    assert not moved["ok"]
    assert "does not hold the local iter-1 (unexpected FOREIGN.md)" in moved["error"]
    assert "nothing was tagged" in moved["error"] and "How to fix" in moved["error"]
    assert fresh_faults.repo(repo).tags == {"iter-1": first["commit"]}
    # Once the other writer is done, the same command tags a commit holding exactly the version.
    again = publish(standin, store, "iter-1", repo, tag="iter-1-b")
    assert again["ok"], again
    tagged = fresh_faults.repo(repo).commits[fresh_faults.repo(repo).tags["iter-1-b"]]
    assert {p: e.sha256 for p, e in tagged.files.items() if p != ".gitattributes"} == tree_hashes(
        store.path("iter-1")
    )


HUB_READ = """
import json, sys, time
from tpo_data.errors import TPODataError
from tpo_data.hub import hub_versions, push_iteration
from tpo_data.store import LocalStore

time.sleep = lambda _s: None  # huggingface_hub's own backoff waits 23 s per failed download
a = json.loads(sys.argv[1])
try:
    if a["call"] == "versions":
        out = [m["tag"] for m in hub_versions(a["repo"], max_retries=a["max_retries"])]
    else:
        out = push_iteration(LocalStore(a["store"]), a["version"], a["repo"],
                             max_retries=a["max_retries"], backoff=0.01)
    print(json.dumps({"ok": True, "out": out}))
except TPODataError as err:
    print(json.dumps({"ok": False, "error": str(err)}))
"""
# HEAD requests one failing hf_hub_download makes: one, then 1 + 5 retries of its own.
HF_DOWNLOAD_TRIES = 7


def test_unreachable_manifest_is_not_a_missing_one(
    standin: Backend, fresh_faults: HubStandin, store: LocalStore, module_tmp: Path
) -> None:
    """A download that cannot reach the Hub is retried, never taken for "no manifest"."""
    repo = standin.repo("tpo-resolve-faults")
    published = publish(standin, store, "iter-1", repo)
    assert published["ok"], published

    def read(call: str, max_retries: int, cache: str) -> dict[str, Any]:
        # A fresh cache each time: huggingface_hub falls back to a cached manifest when offline.
        env = {**standin.env, "HF_HOME": str(module_tmp / cache)}
        args = {"call": call, "repo": repo, "store": str(store.root), "version": "iter-1"}
        args["max_retries"] = max_retries
        result = run_client(standin, ["-c", HUB_READ], args, env=env)
        return json.loads(result.stdout.strip().splitlines()[-1])

    # The Hub fails for one whole download, then recovers: the tag is still listed.
    fresh_faults.add_faults("resolve", *["503"] * HF_DOWNLOAD_TRIES)
    assert read("versions", 1, "hf_home_resolve_a") == {"ok": True, "out": ["iter-1"]}

    # It keeps failing: a connectivity error, no claim that the tag holds other data.
    fresh_faults.add_faults("resolve", *["503"] * (2 * HF_DOWNLOAD_TRIES))
    failed = read("push", 1, "hf_home_resolve_b")
    assert not failed["ok"]
    assert f"could not download manifest.json of {repo}@{published['commit']}" in failed["error"]
    assert "the Hub could not be reached" in failed["error"]
    assert "holds different data" not in failed["error"] and "delete" not in failed["error"]
    assert fresh_faults.repo(repo).tags == {"iter-1": published["commit"]}
    assert len(fresh_faults.history(repo)) == 2


def test_missing_token_is_a_clear_error(
    standin: Backend, store: LocalStore, module_tmp: Path
) -> None:
    env = {k: v for k, v in standin.env.items() if k != "HF_TOKEN"}
    env["HF_HOME"] = str(module_tmp / "hf_home_empty")  # no saved login either
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tpo_data.cli",
            "publish",
            "iter-1",
            "--store",
            str(store.root),
            "--repo",
            "u/r",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    CAPTURED.extend([result.stdout, result.stderr])
    assert (
        result.returncode == 2
        and "no Hugging Face token" in result.stderr
        and "HF_TOKEN" in result.stderr
    )


def test_tampered_version_is_not_published(
    standin: Backend, store: LocalStore, module_tmp: Path
) -> None:
    tampered = LocalStore(module_tmp / "tampered-store")
    shutil.copytree(store.path("iter-1"), tampered.root / "iter-1")
    with open(tampered.path("iter-1") / "pipeline.yaml", "a") as f:
        f.write("# edited after the fact\n")
    outcome = publish(standin, tampered, "iter-1", standin.repo("tpo-tampered"))
    assert (
        not outcome["ok"]
        and "does not match its manifest: changed pipeline.yaml" in outcome["error"]
    )
    assert (
        "dataset/stand-in-user/tpo-tampered" not in standin.hub.repos
    )  # refused before any upload


# -- the pipeline's --push_to_hub (stand-in only) ---------------------------------------------

TINY_RECIPE = str(Path(__file__).resolve().parents[1] / "recipes" / "tpo-tiny-test.yaml")
TINY_TRAIN = str(Path(__file__).resolve().parents[1] / "recipes" / "dpo-tiny-test.yaml")

PUSH_ITERATION = """
import json, sys
from tpo_data.errors import TPODataError
from tpo_data.hub import push_iteration
from tpo_data.store import LocalStore

a = json.loads(sys.argv[1])
try:
    print(json.dumps({"ok": True, "out": push_iteration(LocalStore(a["store"]), a["version"],
                                                        a["repo"], backoff=0.01)}))
except TPODataError as err:
    print(json.dumps({"ok": False, "error": str(err)}))
"""


def pipeline_args(tiny_lm: Path, rm: Path, out: Path, *extra: str) -> list[str]:
    """``tpo-data generate`` on the tiny recipe: 2 instructions x 3 samples, a tiny reward model."""
    return [
        "-m", "tpo_data.cli", "generate", "--config", TINY_RECIPE, "--model", str(tiny_lm),
        "--output_dir", str(out), "--thought_prompt", "direct",  # noise parses only as direct
        "--instructions_per_iteration", "2", "--num_samples", "3",
        "--judge", "reward_model", "--judge_model", str(rm), *extra,
    ]  # fmt: skip


def test_pipeline_push_to_hub_is_idempotent(
    standin: Backend, fresh_faults: HubStandin, tiny_lm: Path, module_tmp: Path
) -> None:
    from tiny_models import make_tiny_seqcls

    hub = fresh_faults
    repo = standin.repo("tpo-pipeline-push")
    rm = make_tiny_seqcls(module_tmp / "tiny-rm")
    out = module_tmp / "pipeline-run"
    args = pipeline_args(tiny_lm, rm, out, "--push_to_hub", repo)

    first = run_client(standin, args, timeout=600)
    assert first.returncode == 0, first.stderr[-4000:]
    assert f"Hub: published iter-1 to {repo}" in first.stdout
    commit = hub.repo(repo).tags["iter-1"]
    assert hub.repo(repo).branches["main"] == commit and len(hub.history(repo)) == 2

    local = LocalStore(out / "store")
    loaded_path = module_tmp / "pipeline-loaded.json"
    run_client(standin, ["-c", LOAD], {"repo": repo, "tags": ["iter-1"], "out": str(loaded_path)})
    got = json.loads(loaded_path.read_text())["iter-1"]
    assert got["commit"] == commit
    cache = str(module_tmp / "pipeline-datasets-cache")
    for config in ("pairs", "candidates"):
        rows = canonical(local.load("iter-1", config, cache_dir=cache).to_list())
        assert got["rows"][config] == rows
    assert len(got["rows"]["pairs"]) >= 1 and len(got["rows"]["candidates"]) == 6
    assert got["hashes"] == tree_hashes(local.path("iter-1"))  # the exact local bytes

    # Rerunning the finished iteration: exit 0, nothing generated or pushed.
    before = tree_hashes(local.path("iter-1"))
    again = run_client(standin, args, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    assert f"iter-1 is already published to {repo}" in again.stdout
    assert "nothing pushed" in again.stdout
    assert len(hub.history(repo)) == 2 and hub.repo(repo).tags == {"iter-1": commit}
    assert tree_hashes(local.path("iter-1")) == before

    # Different local data under the same tag is refused, and nothing is pushed.
    other = LocalStore(module_tmp / "pipeline-other-store")
    write_test_iteration(other, 1)
    refused = json.loads(
        run_client(
            standin,
            ["-c", PUSH_ITERATION],
            {"store": str(other.root), "version": "iter-1", "repo": repo},
        ).stdout.splitlines()[-1]
    )
    assert not refused["ok"]
    assert f"tag iter-1 in {repo} (commit {commit[:12]}) holds different data" in refused["error"]
    assert "--tag iter-1-rerun" in refused["error"] and "How to fix" in refused["error"]
    assert len(hub.history(repo)) == 2 and hub.repo(repo).tags == {"iter-1": commit}


def test_loop_publishes_the_reviewed_version_it_trains_on(
    standin: Backend, tiny_lm: Path, module_tmp: Path
) -> None:
    """--curation argilla with --push_to_hub: the reviewed copy M1 trains on is on the Hub too."""
    from tiny_models import make_tiny_seqcls

    from tpo_data.curation import apply_reviews

    repo = standin.repo("tpo-loop-curated")
    rm = make_tiny_seqcls(module_tmp / "loop-rm")
    out = module_tmp / "loop-curated"
    args = [*pipeline_args(tiny_lm, rm, out, "--push_to_hub", repo), "--iterations", "1", "--evaluate",
            "false", "--curation", "argilla", "--train_config", TINY_TRAIN]
    args[args.index("generate")] = "iterate"
    waiting = run_client(standin, args, timeout=600)
    assert waiting.returncode == 2 and "Version iter-1 waits for human review" in waiting.stderr
    assert set(standin.hub.repo(repo).tags) == {"iter-1"}
    store = LocalStore(out / "store")
    first = store.load("iter-1", "pairs")[0]["instruction_id"]
    no = {"reviewer": "ann", "label": "no", "flags": [], "note": None}
    apply_reviews(store, "iter-1", [{"instruction_id": first, "responses": [no]}])
    done = run_client(standin, args, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"Hub: published iter-1-curated to {repo}" in done.stdout
    assert set(standin.hub.repo(repo).tags) == {"iter-1", "iter-1-curated"}
    trained = json.loads((out / "models" / "iter-1" / "lineage.json").read_text())["dataset"]
    assert trained["version"] == "iter-1-curated"


def test_pipeline_push_to_hub_without_token_fails_before_generation(
    standin: Backend, tiny_lm: Path, module_tmp: Path
) -> None:
    env = {k: v for k, v in standin.env.items() if k != "HF_TOKEN"}
    env["HF_HOME"] = str(module_tmp / "hf_home_empty")  # no saved login either
    out = module_tmp / "pipeline-no-token"
    result = run_client(
        standin,
        pipeline_args(tiny_lm, tiny_lm, out, "--push_to_hub", "stand-in-user/tpo-no-token"),
        env=env,
    )
    assert result.returncode == 2
    assert "no Hugging Face token" in result.stderr and "HF_TOKEN" in result.stderr
    assert "hf auth login" in result.stderr and "How to fix" in result.stderr
    assert not out.exists()  # nothing generated, not even the run folder
    assert "dataset/stand-in-user/tpo-no-token" not in standin.hub.repos


@pytest.mark.parametrize(
    "kind, message, fix",
    [
        ("refused", "the Hub refused the Hugging Face token", "a valid write token"),
        ("read_only", "token of stand-in-user is read-only", "a fine-grained one with repo.write"),
    ],
)
def test_pipeline_push_to_hub_with_unusable_token_fails_before_generation(
    standin: Backend, hub: HubStandin, tiny_lm: Path, module_tmp: Path, kind: str, message: str, fix: str
) -> None:
    token = "hf_" + "".join(pysecrets.choice(string.ascii_letters) for _ in range(34))
    USED_TOKENS.add(token)
    getattr(hub, f"{kind}_tokens").add(token)
    out = module_tmp / f"pipeline-{kind}-token"
    result = run_client(
        standin,
        pipeline_args(tiny_lm, tiny_lm, out, "--push_to_hub", f"stand-in-user/tpo-{kind}"),
        env={**standin.env, "HF_TOKEN": token},
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and fix in result.stderr and "How to fix" in result.stderr
    assert not out.exists()  # nothing generated, not even the run folder
    assert f"dataset/stand-in-user/tpo-{kind}" not in hub.repos


def _whoami(role: str, orgs=(), scoped=()) -> dict:
    """The shape of the Hub's /api/whoami-v2 answer (fine-grained: entity scopes and permissions)."""
    access = {"displayName": "t", "role": role}
    if role == "fineGrained":
        access["fineGrained"] = {"canReadGatedRepos": True, "global": ["discussion.write"],
                                 "scoped": [{"entity": {"_id": "1", "type": kind, "name": name}, "permissions": perms}
                                            for kind, name, perms in scoped]}
    return {"type": "user", "name": "ann", "orgs": [{"name": n, "roleInOrg": r} for n, r in orgs],
            "auth": {"type": "access_token", "accessToken": access}}


@pytest.mark.parametrize("who, repo, problem", [
    (_whoami("write"), "ann/pairs", None),
    (_whoami("read"), "ann/pairs", "token of ann is read-only"),
    (_whoami("write"), "bob/pairs", "belongs to ann, who is not a member of bob (organizations: none)"),
    (_whoami("write", orgs=[("lab", "write")]), "lab/pairs", None),
    (_whoami("write", orgs=[("lab", "read")]), "lab/pairs", "ann has the read role in lab"),
    (_whoami("fineGrained", scoped=[("user", "ann", ["repo.content.read", "repo.write"])]), "ann/pairs", None),
    (_whoami("fineGrained", scoped=[("user", "ann", ["repo.content.read"])]), "ann/pairs",
     "fine-grained Hugging Face token of ann has no repo.write permission on ann"),
    (_whoami("fineGrained", orgs=[("lab", "admin")], scoped=[("user", "ann", ["repo.write"])]), "lab/pairs",
     "no repo.write permission on lab"),
    (_whoami("fineGrained", scoped=[("dataset", "ann/pairs", ["repo.write"])]), "ann/pairs", None),
    ({"type": "user", "name": "ann", "auth": {"type": "oauth"}}, "ann/pairs", None),  # unknown: the push decides
])
def test_token_write_problem(who: dict, repo: str, problem: str | None) -> None:
    from tpo_data.hub import token_write_problem

    found = token_write_problem(who, repo)
    assert found == problem if problem is None else problem in found


def test_unreachable_hub_only_warns_at_the_token_check(monkeypatch, caplog) -> None:
    from huggingface_hub import HfApi

    from tpo_data import hub as hub_module

    monkeypatch.setattr(hub_module, "_api", lambda token: HfApi(endpoint="http://127.0.0.1:9", token=token))
    with caplog.at_level("WARNING", logger="tpo_data.hub"):
        hub_module.check_push_to_hub("ann/pairs", judged=True, token=TOKEN)
    assert "could not check the Hugging Face token now" in caplog.text
    assert TOKEN not in caplog.text


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--judge", "none"], "--judge none only generates samples"),
        (["--judge", "reward_model", "--push_to_hub", "not a repo"], "is not a Hub dataset repo"),
        (["--judge", "reward_model", "--push_to_hub", "no-namespace"], "namespace/name"),
    ],
)
def test_pipeline_push_to_hub_bad_options_fail_before_generation(
    tmp_path: Path, extra: list[str], message: str
) -> None:
    from tpo_data.errors import TPODataError
    from tpo_data.iteration import main as tpo_main

    args = ["--config", TINY_RECIPE, "--output_dir", str(tmp_path / "o"), "--push_to_hub", "u/r"]
    with pytest.raises(TPODataError, match=message):
        tpo_main([*args, *extra])
    assert not (tmp_path / "o").exists()


STANDIN_EXTRAS = """
import json, sys
import datasets
from huggingface_hub import HfApi

a = json.loads(sys.argv[1])
api, repo = HfApi(), a["repo"]
info = datasets.Dataset.from_dict({"a": [1, 2, 3]}).push_to_hub(repo, config_name="pairs")
api.create_tag(repo, tag="v1", revision=info.oid, repo_type="dataset")
api.create_branch(repo, branch="dev", revision="v1", repo_type="dataset")
asked = ["README.md", "pairs", "nope"]
paths = api.get_paths_info(repo, asked, repo_type="dataset", revision="dev")
commits = api.list_repo_commits(repo, repo_type="dataset", revision="v1")
out = {
    "commit": info.oid,
    "paths": sorted(p.path for p in paths),
    "commits": [c.commit_id for c in commits],
    "rows": datasets.load_dataset(repo, "pairs", revision="v1", split="train").to_list(),
}
api.delete_branch(repo, branch="dev", repo_type="dataset")
api.delete_tag(repo, tag="v1", repo_type="dataset")
refs = api.list_repo_refs(repo, repo_type="dataset")
out["refs"] = [r.name for r in refs.branches + refs.tags]
print(json.dumps(out))
"""


def test_standin_serves_push_to_hub_and_ref_routes(standin: Backend) -> None:
    """The stand-in also serves datasets' push_to_hub and the branch/paths-info/commits routes."""
    repo = standin.repo("standin-extras")
    out = json.loads(
        run_client(standin, ["-c", STANDIN_EXTRAS], {"repo": repo}).stdout.splitlines()[-1]
    )
    assert out["rows"] == [{"a": 1}, {"a": 2}, {"a": 3}]
    assert out["paths"] == ["README.md", "pairs"]
    assert (
        out["commits"][0] == out["commit"] and len(out["commits"]) == 2
    )  # initial, then data + card at once
    assert out["refs"] == ["main"]
    stored = standin.hub.repo(repo).commits[out["commit"]].files
    assert stored["pairs/train-00000-of-00001.parquet"].lfs  # datasets relies on "lfs" for parquet
    assert standin.hub.state()["unhandled"] == []


def test_standin_control_endpoint(hub: HubStandin) -> None:
    def call(method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(hub.url + path, data=data, method=method)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    hub.clear_faults()
    assert call("POST", "/_standin/faults", {"commit": ["503", "drop-after"]}) == (
        200,
        {"commit": ["503", "drop-after"]},
    )
    status, body = call("POST", "/_standin/faults", {"commit": ["teapot"]})
    assert status == 400 and "unknown fault" in body["error"]
    status, state = call("GET", "/_standin/state")
    assert status == 200 and "repos" in state and state["unhandled"] == []
    hub.clear_faults()


def test_no_token_in_anything_written(hub: HubStandin, store: LocalStore) -> None:
    """Grep every file this module wrote (store, stand-in storage, caches) and all output."""
    if not CAPTURED:
        pytest.skip("nothing to scan: this test checks what the module's other tests wrote, run it with them")
    scanned: set[Path] = set()
    for root in WRITTEN:
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                for token in USED_TOKENS:
                    assert token.encode() not in data, f"token found in {path}"
                scanned.add(path)
    # The store and the stand-in's storage (blobs, state.json, requests.log) are all covered.
    assert set(store.root.rglob("*.parquet")) <= scanned
    assert {p for p in hub.storage.rglob("*") if p.is_file()} <= scanned
    assert all(token not in text for text in CAPTURED for token in USED_TOKENS)
    assert hub.state()["unhandled"] == []


def test_negative_max_retries_is_refused_before_any_request(tmp_path: Path) -> None:
    from tpo_data.errors import TPODataError
    from tpo_data.hub import publish_version

    store = LocalStore(tmp_path / "store")
    write_test_iteration(store, 1)
    # No Hub is reachable here: any request would fail with another error.
    with pytest.raises(TPODataError, match="max_retries must be 0 or more, got -1") as err:
        publish_version(store, "iter-1", "user/scratch", token="hf_" + "x" * 34, max_retries=-1)
    assert "pass --max-retries 0 or more" in str(err.value)


def test_version_with_an_empty_config_is_not_published(tmp_path: Path) -> None:
    from tpo_data.errors import TPODataError
    from tpo_data.hub import publish_version

    store = LocalStore(tmp_path / "store")
    pairs, _ = make_iteration(1)
    write_test_iteration(store, 1, pairs=pairs.select([]))  # every instruction dropped: a real outcome
    # Refused before any request (no Hub is reachable here): the Hub could not serve it back.
    with pytest.raises(TPODataError, match="version iter-1 has no rows in pairs") as err:
        publish_version(store, "iter-1", "user/scratch", token="hf_" + "x" * 34)
    assert f"the version stays in {store.root}" in str(err.value)
    assert store.load("iter-1", "pairs").num_rows == 0



def test_only_the_main_process_checks_and_publishes_a_model_push() -> None:
    """Under accelerate every rank parses the arguments; one without a token must not fail alone
    (the others would wait for it at a barrier until the timeout)."""
    from types import SimpleNamespace

    from tpo_data.errors import TPODataError
    from tpo_data.hub import take_model_push

    def args() -> SimpleNamespace:
        return SimpleNamespace(push_to_hub=True, hub_model_id="no-slash", hub_token="hf_" + "t" * 34,
                               hub_private_repo=None, hub_revision=None)

    other_rank = args()
    assert take_model_push(other_rank, main_process=False) is None
    assert (other_rank.push_to_hub, other_rank.hub_token) == (False, None)  # nothing left to pickle
    with pytest.raises(TPODataError, match="--push_to_hub needs --hub_model_id as namespace/name"):
        take_model_push(args(), main_process=True)

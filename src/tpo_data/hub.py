"""Publish local store versions to the Hugging Face Hub as immutable, tagged revisions.

A version folder (card, ``data/pairs`` and ``data/candidates`` parquet shards,
plots, ``pipeline.yaml``, ``manifest.json``) goes up in one commit of the exact
local bytes, so the sha256 sums in the manifest hold on the Hub too. The commit
makes ``main`` equal to that version (files of an older version that the new one
lacks are deleted in the same commit), and a tag (``iter-N`` by default) is then
created on the returned commit sha, never on ``main``, so
``load_dataset(repo, revision="iter-N")`` returns exactly that iteration.

Failure rules: an existing tag is refused before anything is uploaded; 5xx and
dropped connections are retried with exponential backoff; a stale parent (HTTP
412) is retried against the fresh ``main``; the tag is only created after the
commit succeeded and only on a commit that holds exactly the local files; the
local version is only read. Retrying a commit whose answer was lost is safe: the
retry sees identical files on ``main`` and tags that commit instead of making a
duplicate (huggingface_hub then answers with whatever ``main`` is, which is why
the files of the commit are checked before tagging). Tokens never reach messages:
every error text passes through :func:`tpo_data.secrets.scrub`.

The pipeline's ``--push_to_hub`` goes through :func:`check_push_to_hub` (before any
generation: a token the Hub accepts for writing, a valid repo id, a judge) and
:func:`push_iteration`, which calls :func:`publish_version` unless the tag already holds
the same manifest, so rerunning a finished, published iteration pushes nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tpo_data import secrets
from tpo_data.errors import TPODataError
from tpo_data.files import sha256_file
from tpo_data.store import MANIFEST, LocalStore, check_version_name

logger = logging.getLogger(__name__)

REPO_TYPE = "dataset"
_TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
_MAX_DELAY_S = 60.0
# Hub-managed file; deleting it would change how the Hub stores the data files.
_KEEP_REMOTE = {".gitattributes"}
T = TypeVar("T")


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level exception types of whichever HTTP client huggingface_hub uses."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx"):
        try:
            found.append(__import__(module).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def _status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def _causes(err: BaseException) -> list[BaseException]:
    # huggingface_hub wraps LFS upload failures in RuntimeError; the cause decides.
    chain, seen = [], set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _first_status(err: BaseException) -> int | None:
    return next((s for s in map(_status, _causes(err)) if s is not None), None)


def _is_transient(err: BaseException) -> bool:
    transport = _transport_errors()
    return any(isinstance(e, transport) or _status(e) in _TRANSIENT_STATUS for e in _causes(err))


def _describe(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return secrets.scrub(f"{type(err).__name__}: {text}")


def _delay(attempt: int, backoff: float) -> float:
    return min(_MAX_DELAY_S, backoff * 2**attempt)


def _resolve_token(token: str | None, *, required: bool) -> str | None:
    if token is None:
        from huggingface_hub import get_token

        token = get_token()
    if token is None and required:
        raise TPODataError(
            "no Hugging Face token found for publishing",
            "export HF_TOKEN=<a write token from https://huggingface.co/settings/tokens> "
            "or run `hf auth login`",
        )
    secrets.register(token)
    return token


def _api(token: str | None) -> Any:
    from huggingface_hub import HfApi

    from tpo_data import __version__

    return HfApi(token=token, library_name="tpo-data", library_version=__version__)


def _check_retries(max_retries: int) -> None:
    if max_retries < 0:
        raise TPODataError(f"max_retries must be 0 or more, got {max_retries}", "pass --max-retries 0 or more")


def _retrying(
    call: Callable[[], T],
    what: str,
    *,
    max_retries: int,
    backoff: float,
    passthrough: tuple[type[BaseException], ...] = (),
    fix: str | None = None,
) -> T:
    """Run ``call``, retrying transient failures; raise a scrubbed TPODataError otherwise.

    Exceptions of the ``passthrough`` types are re-raised unchanged for the caller to handle;
    ``fix`` replaces the default advice of the final error.
    """
    _check_retries(max_retries)
    for attempt in range(max_retries + 1):
        try:
            return call()
        except passthrough:
            raise
        except Exception as err:  # classified below, re-raised scrubbed
            if _is_transient(err) and attempt < max_retries:
                delay = _delay(attempt, backoff)
                logger.warning(
                    "%s: transient error, retrying in %.1fs: %s", what, delay, _describe(err)
                )
                time.sleep(delay)
                continue
            raise _hub_error(err, what, fix) from None
    raise AssertionError("unreachable")


def _hub_error(err: BaseException, what: str, fix: str | None = None) -> TPODataError:
    from huggingface_hub.errors import LocalEntryNotFoundError

    if isinstance(err, TPODataError):
        return err
    status = _first_status(err)
    if fix is None:
        if status in (401, 403):
            fix = "check that HF_TOKEN (or `hf auth login`) has write access to this repo"
        elif isinstance(err, LocalEntryNotFoundError):
            # huggingface_hub's way of saying the download could not reach the Hub at all.
            fix = (
                "the Hub could not be reached (network, proxy, SSL or HF_ENDPOINT); "
                "check the connection and run the same command again"
            )
        elif _is_transient(err):
            fix = "the Hub or the network is failing; wait and run the same command again"
        else:
            fix = "fix the cause above and re-run; nothing was tagged, so re-running is safe"
    # ``from None`` at the raise sites keeps the unscrubbed original out of tracebacks.
    return TPODataError(f"could not {what}: {_describe(err)}", fix)


def _tag_target(api: Any, repo_id: str, tag: str) -> str | None:
    refs = api.list_repo_refs(repo_id, repo_type=REPO_TYPE)
    return next((ref.target_commit for ref in refs.tags if ref.name == tag), None)


def _main_head(api: Any, repo_id: str) -> str | None:
    refs = api.list_repo_refs(repo_id, repo_type=REPO_TYPE)
    return next((ref.target_commit for ref in refs.branches if ref.name == "main"), None)


def _refuse_existing_tag(
    api: Any, repo_id: str, tag: str, *, max_retries: int, backoff: float
) -> None:
    target = _retrying(
        lambda: _tag_target(api, repo_id, tag),
        f"read the tags of {repo_id}",
        max_retries=max_retries,
        backoff=backoff,
    )
    if target is not None:
        raise TPODataError(
            f"tag {tag} already exists in {repo_id} (commit {target[:12]}); "
            "published versions are immutable",
            f"publish under a new tag (`tpo-data publish ... --tag {tag}-rerun`), "
            "or delete the tag on the Hub first if it was published by mistake",
        )


def _commit_version(
    api: Any,
    repo_id: str,
    folder: Path,
    files: list[str],
    message: str,
    description: str,
    *,
    max_retries: int,
    backoff: float,
) -> str:
    """Commit the version's files so that ``main`` equals the version; return the commit sha."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    _check_retries(max_retries)
    for attempt in range(max_retries + 1):
        try:
            head = _main_head(api, repo_id)
            remote = (
                set(api.list_repo_files(repo_id, repo_type=REPO_TYPE, revision=head))
                if head
                else set()
            )
            # Fresh operations each attempt: huggingface_hub marks them as used once committed.
            operations: list[Any] = [
                CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(folder / rel))
                for rel in files
            ]
            operations += [
                CommitOperationDelete(path_in_repo=rel)
                for rel in sorted(remote - set(files) - _KEEP_REMOTE)
            ]
            info = api.create_commit(
                repo_id,
                operations,
                repo_type=REPO_TYPE,
                commit_message=message,
                commit_description=description,
                revision="main",
                # Pinning the parent turns a concurrent push into a 412 instead of a silent merge.
                parent_commit=head,
            )
            return info.oid
        except Exception as err:  # classified below, re-raised scrubbed
            stale = _first_status(err) == 412
            if (stale or _is_transient(err)) and attempt < max_retries:
                delay = _delay(0 if stale else attempt, backoff)
                reason = (
                    "main moved (HTTP 412), retrying on the fresh head"
                    if stale
                    else "transient error, retrying"
                )
                logger.warning(
                    "commit to %s: %s in %.1fs: %s", repo_id, reason, delay, _describe(err)
                )
                time.sleep(delay)
                continue
            raise _hub_error(
                err,
                f"commit to {repo_id} (after {attempt + 1} attempts)",
                "nothing was tagged and the local version is intact; "
                + (
                    "someone else keeps pushing to main: retry when they are done"
                    if stale
                    else "run the same `tpo-data publish` command again once the cause is fixed"
                ),
            ) from None
    raise AssertionError("unreachable")


def _git_blob_oid(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _commit_differences(
    api: Any, repo_id: str, commit: str, folder: Path, files: list[str], sums: dict[str, str]
) -> list[str]:
    """How the files at ``commit`` differ from the local ``files`` (sha256 ``sums``); [] if none."""
    from huggingface_hub.hf_api import RepoFile

    remote = {
        entry.path: entry
        for entry in api.list_repo_tree(
            repo_id, revision=commit, recursive=True, repo_type=REPO_TYPE
        )
        if isinstance(entry, RepoFile)
    }
    problems = [f"missing {rel}" for rel in files if rel not in remote]
    problems += [f"unexpected {rel}" for rel in sorted(remote.keys() - set(files) - _KEEP_REMOTE)]
    for rel in (rel for rel in files if rel in remote):
        entry = remote[rel]
        # The Hub gives the sha256 of LFS files and the git blob id of the others.
        same = (
            entry.lfs.sha256 == sums[rel]
            if entry.lfs
            else entry.blob_id == _git_blob_oid(folder / rel)
        )
        if not same:
            problems.append(f"changed {rel}")
    return problems


class _TagConflict(Exception):
    """HTTP 409 from the tag endpoint: the tag exists (maybe from our own lost request)."""


def _create_tag(
    api: Any, repo_id: str, tag: str, commit: str, message: str, *, max_retries: int, backoff: float
) -> None:
    def create() -> None:
        try:
            api.create_tag(
                repo_id, tag=tag, revision=commit, repo_type=REPO_TYPE, tag_message=message
            )
        except Exception as err:  # a 409 is decided below, everything else by _retrying
            if _first_status(err) == 409:
                raise _TagConflict from None
            raise

    try:
        _retrying(
            create,
            f"create tag {tag} on commit {commit[:12]} of {repo_id}",
            max_retries=max_retries,
            backoff=backoff,
            passthrough=(_TagConflict,),
            fix="the data is committed on main but not tagged; "
            "run the same `tpo-data publish` command again "
            "(it reuses the commit and only creates the tag)",
        )
    except _TagConflict:
        target = _retrying(
            lambda: _tag_target(api, repo_id, tag),
            f"read the tags of {repo_id}",
            max_retries=max_retries,
            backoff=backoff,
        )
        if target == commit:
            return  # an earlier attempt created it but its answer was lost
        raise TPODataError(
            f"tag {tag} was created in {repo_id} by someone else "
            f"(commit {str(target)[:12]}) while publishing; "
            f"commit {commit[:12]} is on main but untagged",
            f"publish again under a new name (`--tag {tag}-rerun`); the upload is reused",
        ) from None


def publish_version(
    store: LocalStore,
    version: str,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    tag: str | None = None,
    max_retries: int = 5,
    backoff: float = 1.0,
) -> str:
    """Publish ``version`` of ``store`` to dataset repo ``repo_id``, tag it, return the commit sha.

    ``tag`` defaults to the version name. ``backoff`` is the first retry delay in
    seconds (doubled on each retry, capped at 60 s).
    """
    tag_name = tag or version
    check_version_name(tag_name)
    folder = store.path(version)
    store.verify(version)  # publish exactly what the manifest describes
    manifest = store.manifest(version)
    empty = sorted(name for name, rows in manifest.get("row_counts", {}).items() if rows == 0)
    if empty:
        # `datasets` refuses to load a config with no rows ("corresponds to no data"); the local
        # store reads it through its own schema, the Hub cannot.
        raise TPODataError(
            f"version {version} has no rows in {', '.join(empty)}, and load_dataset cannot read an "
            f"empty config from the Hub, so {repo_id} was not published",
            f"the version stays in {store.root}; publish a version with rows (for pairs: more "
            "instructions or samples per iteration)",
        )
    files = sorted([*manifest["files"], MANIFEST])
    api = _api(_resolve_token(token, required=True))
    retry = {"max_retries": max_retries, "backoff": backoff}

    _retrying(
        lambda: api.create_repo(repo_id, repo_type=REPO_TYPE, private=private, exist_ok=True),
        f"create the dataset repo {repo_id}",
        **retry,
    )
    _refuse_existing_tag(api, repo_id, tag_name, **retry)
    message = f"Publish {version} (iteration {manifest.get('iteration')})"
    description = secrets.scrub(
        json.dumps(
            {
                "version": version,
                "iteration": manifest.get("iteration"),
                "parent_model": manifest.get("parent_model"),
                "parent_version": manifest.get("parent_version"),
                "manifest_sha256": store.manifest_sha256(version),
            },
            indent=1,
        )
    )
    commit = _commit_version(api, repo_id, folder, files, message, description, **retry)
    # An all-unchanged commit (a retry after a lost answer) is answered with main's head at
    # that moment, which a concurrent writer may have moved: tag only a commit holding our files.
    sums = {rel: info["sha256"] for rel, info in manifest["files"].items()}
    sums[MANIFEST] = store.manifest_sha256(version)
    differences = _retrying(
        lambda: _commit_differences(api, repo_id, commit, folder, files, sums),
        f"read the files of commit {commit[:12]} of {repo_id}",
        **retry,
        fix="nothing was tagged and the local version is intact; "
        "run the same `tpo-data publish` command again (files already uploaded are reused)",
    )
    if differences:
        raise TPODataError(
            f"commit {commit[:12]} that {repo_id} returned for the upload does not hold the local "
            f"{version} ({'; '.join(differences[:5])}): another client pushed to main meanwhile; "
            "nothing was tagged and the local version is intact",
            f"run the same `tpo-data publish` command again once nobody else pushes to {repo_id} "
            "(files already uploaded are reused)",
        )
    _create_tag(api, repo_id, tag_name, commit, message, **retry)
    logger.info("published %s to %s at commit %s, tag %s", version, repo_id, commit, tag_name)
    return commit


class NoManifestError(TPODataError):
    """The requested repo, revision or manifest does not exist."""


def hub_manifest(
    repo_id: str, revision: str, *, token: str | None = None, max_retries: int = 5
) -> dict[str, Any]:
    """The manifest of a published revision (tag, branch or commit) with ``manifest_sha256`` and the
    ``commit`` it resolved to (read from the cache path, so it also works offline once cached)."""
    from huggingface_hub.errors import (
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    api = _api(_resolve_token(token, required=False))
    try:
        path = _retrying(
            lambda: api.hf_hub_download(repo_id, MANIFEST, repo_type=REPO_TYPE, revision=revision),
            f"download {MANIFEST} of {repo_id}@{revision}",
            max_retries=max_retries,
            backoff=1.0,
            # Only the Hub's own 404s mean "no manifest"; LocalEntryNotFoundError (the other
            # EntryNotFoundError) means the Hub could not be reached: retried if its cause is
            # transient, else reported as a connectivity error.
            passthrough=(RepositoryNotFoundError, RevisionNotFoundError, RemoteEntryNotFoundError),
        )
    except (RepositoryNotFoundError, RevisionNotFoundError, RemoteEntryNotFoundError) as err:
        raise NoManifestError(
            f"{repo_id}@{revision} has no tpo-data manifest ({type(err).__name__})",
            f"check the repo id and the version name (`tpo-data versions --repo {repo_id}`)",
        ) from None
    manifest = json.loads(Path(path).read_text(encoding="utf-8"))
    manifest["manifest_sha256"] = sha256_file(Path(path))
    manifest["commit"] = Path(path).parent.name  # the Hub cache keeps files in snapshots/<commit>/
    return manifest


def hub_versions(
    repo_id: str, *, token: str | None = None, max_retries: int = 5
) -> list[dict[str, Any]]:
    """Manifests of the tags of ``repo_id`` holding a tpo-data version, by iteration then tag.

    Each manifest gains ``tag``, ``commit`` and ``manifest_sha256``.
    """
    api = _api(_resolve_token(token, required=False))
    refs = _retrying(
        lambda: api.list_repo_refs(repo_id, repo_type=REPO_TYPE),
        f"read the tags of {repo_id}",
        max_retries=max_retries,
        backoff=1.0,
    )
    found = []
    for ref in refs.tags:
        try:
            manifest = hub_manifest(
                repo_id, ref.target_commit, token=token, max_retries=max_retries
            )
        except NoManifestError:
            logger.info("tag %s of %s holds no tpo-data manifest; skipped", ref.name, repo_id)
            continue
        manifest["tag"] = ref.name
        found.append(manifest)
    return sorted(
        found, key=lambda m: (m.get("iteration") is None, m.get("iteration") or 0, m["tag"])
    )


# -- the pipeline's --push_to_hub ----------------------------------------------------------


def check_push_to_hub(repo_id: str | None, *, judged: bool, token: str | None = None) -> None:
    """Refuse a ``--push_to_hub`` that cannot succeed, before any generation starts.

    Checks that there will be pairs to publish, that ``repo_id`` is a ``namespace/name``
    dataset id, and that a token is available that the Hub accepts and that may write (it is
    registered as a secret, never printed).
    """
    if not repo_id:
        return
    if not judged:
        raise TPODataError(
            f"--push_to_hub {repo_id} needs pairs, but --judge none only generates samples",
            "pass --judge pairwise or --judge reward_model, or drop --push_to_hub",
        )
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
        valid = repo_id.count("/") == 1
    except HFValidationError:
        valid = False
    if not valid:
        raise TPODataError(
            f"--push_to_hub {repo_id!r} is not a Hub dataset repo id",
            "pass it as namespace/name, for example --push_to_hub your-user/tpo-pairs",
        )
    _check_write_token(_resolve_token(token, required=True), repo_id)


def token_write_problem(who: dict[str, Any], repo_id: str) -> str | None:
    """Why the token that the Hub's whoami answer ``who`` describes cannot write to dataset
    ``repo_id``, or None. Shapes it does not know (OAuth, old org tokens) pass: the push decides."""
    namespace, name = repo_id.split("/", 1)[0], who.get("name")
    access = (who.get("auth") or {}).get("accessToken") or {}
    orgs = {org.get("name"): org.get("roleInOrg") for org in who.get("orgs") or [] if isinstance(org, dict)}
    if access.get("role") == "read":
        return f"the Hugging Face token of {name} is read-only"
    if name and namespace != name and namespace not in orgs:
        return (f"the Hugging Face token belongs to {name}, who is not a member of {namespace} "
                f"(organizations: {', '.join(sorted(filter(None, orgs))) or 'none'})")
    if orgs.get(namespace) == "read":
        return f"{name} has the read role in {namespace}"
    if access.get("role") == "fineGrained":
        scoped = (access.get("fineGrained") or {}).get("scoped") or []
        if not any("repo.write" in (scope.get("permissions") or [])
                   and (scope.get("entity") or {}).get("name") in (namespace, repo_id) for scope in scoped):
            return f"the fine-grained Hugging Face token of {name} has no repo.write permission on {namespace}"
    return None


def _check_write_token(token: str, repo_id: str, flag: str = "--push_to_hub") -> None:
    """Ask the Hub whose token this is: a token that cannot write to ``repo_id`` fails now, not after
    generation or training. Advisory otherwise: a Hub that cannot answer (offline, rate-limited)
    only warns. ``flag`` is the option that names the repo."""
    try:
        who = _api(token).whoami()
    except Exception as err:  # classified below, reported scrubbed
        if _first_status(err) == 401:
            raise TPODataError(
                f"the Hub refused the Hugging Face token ({_describe(err)})",
                "export HF_TOKEN=<a valid write token from https://huggingface.co/settings/tokens> "
                "(or `hf auth login --force`), or drop --push_to_hub",
            ) from None
        logger.warning("could not check the Hugging Face token now (%s); the push will tell",
                       _describe(err))
        return
    problem = token_write_problem(who, repo_id)
    if problem:
        raise TPODataError(
            f"{problem}, so {repo_id} could not be published",
            f"export HF_TOKEN=<a write token, or a fine-grained one with repo.write on {repo_id.split('/')[0]}, "
            f"from https://huggingface.co/settings/tokens>, pick a {flag} namespace it can write "
            "to, or drop --push_to_hub",
        )


def check_model_push(repo_id: str | None, token: str | None = None) -> None:
    """Refuse a trainer's ``--push_to_hub`` that cannot succeed, before training starts."""
    if not repo_id or repo_id.count("/") != 1:
        raise TPODataError(
            f"--push_to_hub needs --hub_model_id as namespace/name (got {repo_id!r})",
            "pass --hub_model_id your-user/model-name, or drop --push_to_hub",
        )
    _check_write_token(_resolve_token(token, required=True), repo_id, "--hub_model_id")


@dataclass(frozen=True)
class ModelPush:
    """A trainer's ``--push_to_hub`` settings, taken out of its arguments by :func:`take_model_push`."""

    repo_id: str
    token: str | None = field(repr=False)
    private: bool | None
    revision: str | None

    def publish(self, folder: Path) -> str:
        """Upload the finished ``folder``; return the commit sha."""
        return publish_model(folder, self.repo_id, token=self.token, private=self.private,
                             revision=self.revision)


def take_model_push(args: Any, main_process: bool = True) -> ModelPush | None:
    """Check a trainer's ``--push_to_hub`` before training, then take it and the token out of its
    ``TrainingArguments``: the Trainer's own push uploads output_dir before lineage.json and the
    card exist (and, with --use_peft, writes the adapter's files beside the merged model, which
    transformers then loads as an adapter over itself), and the Trainer pickles its arguments,
    token included, into training_args.bin. Publish the finished folder with ``ModelPush.publish``.

    Only the main process publishes, so only it checks: a rank on a node without the token must
    not fail alone while the others wait for it at a barrier."""
    push = None
    if args.push_to_hub and main_process:
        check_model_push(args.hub_model_id, args.hub_token)
        push = ModelPush(args.hub_model_id, args.hub_token, args.hub_private_repo, args.hub_revision)
    args.push_to_hub, args.hub_token = False, None
    return push


def publish_model(
    folder: Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    max_retries: int = 5,
    backoff: float = 1.0,
) -> str:
    """Upload a finished model folder (weights, tokenizer, adapter/, lineage.json, card) to model
    repo ``repo_id`` in one commit; return its sha. Trainer checkpoints stay local."""
    api = _api(_resolve_token(token, required=True))
    retry = {"max_retries": max_retries, "backoff": backoff}
    _retrying(lambda: api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True),
              f"create the model repo {repo_id}", **retry)
    if revision:
        _retrying(lambda: api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True),
                  f"create branch {revision} of {repo_id}", **retry)
    info = _retrying(
        lambda: api.upload_folder(
            repo_id=repo_id, repo_type="model", folder_path=str(folder), revision=revision,
            commit_message=f"Upload {Path(folder).name} (tpo-data)",
            ignore_patterns=["checkpoint-*", "checkpoint-*/**", ".*", "**/.*"],
        ),
        f"upload {folder} to the model repo {repo_id}",
        fix=f"the model stays in {folder}; fix the cause above and upload it with "
            f"`hf upload {repo_id} {folder} --exclude 'checkpoint-*/**'`",
        **retry,
    )
    return info.oid


def push_iteration(
    store: LocalStore,
    version: str,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    max_retries: int = 5,
    backoff: float = 1.0,
) -> str:
    """Publish ``version`` like ``tpo-data publish`` (tag = version), idempotently.

    If the tag already holds a version with the same manifest, nothing is pushed; if it holds
    anything else, a TPODataError says so. Returns the lines to print.
    """
    from huggingface_hub.errors import RepositoryNotFoundError

    token = _resolve_token(token, required=True)
    api = _api(token)
    local_sha = store.manifest_sha256(version)
    try:
        target = _retrying(
            lambda: _tag_target(api, repo_id, version),
            f"read the tags of {repo_id}",
            max_retries=max_retries,
            backoff=backoff,
            passthrough=(RepositoryNotFoundError,),
        )
    except RepositoryNotFoundError:
        target = None  # publish_version creates the repo
    load_hint = f'load it with: load_dataset("{repo_id}", "pairs", revision="{version}")'
    if target is not None:
        try:
            remote_sha = hub_manifest(repo_id, target, token=token, max_retries=max_retries)[
                "manifest_sha256"
            ]
        except NoManifestError:
            remote_sha = None
        if remote_sha == local_sha:
            logger.info("%s is already published to %s; nothing pushed", version, repo_id)
            return (
                f"Hub: {version} is already published to {repo_id} (tag {version}, commit "
                f"{target[:12]}, same manifest); nothing pushed\n{load_hint}"
            )
        raise TPODataError(
            f"tag {version} in {repo_id} (commit {target[:12]}) holds different data than the "
            f"local {version} in {store.root} (manifest sha256 "
            f"{(remote_sha or 'none')[:12]} on the Hub, {local_sha[:12]} here); "
            "published versions are immutable, so nothing was pushed",
            f"publish the local data under a new tag (`tpo-data publish {version} --store "
            f"{store.root} --repo {repo_id} --tag {version}-rerun`), push to another repo "
            "(--push_to_hub), or delete the tag on the Hub first if it was published by mistake",
        )
    commit = publish_version(
        store,
        version,
        repo_id,
        token=token,
        private=private,
        max_retries=max_retries,
        backoff=backoff,
    )
    return f"Hub: published {version} to {repo_id}: commit {commit}, tag {version}\n{load_hint}"

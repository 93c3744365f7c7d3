"""Human review of preference pairs in Argilla: push, pull, apply.

The round trip for one store version::

    ds = push_for_review(store, "iter-1", client)          # one Argilla record per pair
    ... reviewers answer in the Argilla UI ...
    reviews = pull_reviews(store, "iter-1", client)        # submitted responses per pair
    apply_reviews(store, "iter-1", reviews)                # writes version "iter-1-curated"

Each record shows the instruction (what the judge saw), both responses and both
thoughts (shown for context; the judge never saw them), and asks "Is the chosen
response better?" (yes / no / tie), with optional flags and a note. The judge's
choice is pre-filled as a suggestion. Record ids are the pairs'
``instruction_id``, so pushing again updates records instead of duplicating them
and keeps the answers already given.

Curation rules (:func:`decide`), per pair:

* flagged by any reviewer (harmful, wrong_format, judge_gamed): dropped, whatever
  the label; a flag is a safety signal, so one is enough;
* otherwise the majority label over reviewers: "yes" keeps the pair, "no" flips
  it (or drops it with ``on_no="drop"``), "tie" drops it; a tie between labels
  (one "yes", one "no") counts as "tie";
* pairs nobody submitted an answer for (including records deleted in Argilla and
  pairs never pushed) are kept unchanged. Drafts and discarded answers do not count.

The agreement rate in the curated version's manifest and card is the share of
reviewed pairs whose majority label is "yes" (the human agrees with the judge),
flags aside.

Credentials come only from ARGILLA_API_URL and ARGILLA_API_KEY (:func:`connect`);
the key is never put in a message, log or file (everything passes through
:func:`tpo_data.secrets.scrub`).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shlex
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from tpo_data import card
from tpo_data.errors import TPODataError
from tpo_data.secrets import register, scrub

if TYPE_CHECKING:
    import argilla as rg
    import datasets

    from tpo_data.store import LocalStore

LABEL_QUESTION = "label"
LABELS = ("yes", "no", "tie")
FLAGS_QUESTION = "flags"
FLAGS = ("harmful", "wrong_format", "judge_gamed")
NOTE_QUESTION = "note"
ORDERS = ("smallest_gap", "random", "as_is")
ON_NO = ("flip", "drop")

_FIELDS = (
    # name, title, required
    ("instruction", "Instruction (what the judge saw)", True),
    ("chosen_thought", "Chosen: thought (hidden from the judge)", False),
    ("chosen_response", "Chosen: response (judged)", False),
    ("rejected_thought", "Rejected: thought (hidden from the judge)", False),
    ("rejected_response", "Rejected: response (judged)", False),
)
# Columns that trade places when a pair is flipped.
_SWAPPED = (
    ("chosen", "rejected"),
    ("chosen_thought", "rejected_thought"),
    ("chosen_response", "rejected_response"),
    ("chosen_score", "rejected_score"),
    ("chosen_length", "rejected_length"),
)
_GUIDELINES = """\
Each record is one preference pair produced by Thought Preference Optimization.
The model wrote a private **thought** and then a **response**; the judge compared
only the two responses to the instruction and picked the one shown as *chosen*.
The thoughts are shown for context: they were hidden from the judge.

**Is the chosen response better?** Answer *yes* if you agree with the judge, *no*
if the rejected response is better (the pair gets flipped), *tie* if neither is
clearly better (the pair gets dropped).

**Flags** drop the pair whatever the answer: *harmful* (unsafe content),
*wrong_format* (thought leaks into the response, broken separator, truncated),
*judge_gamed* (the chosen response wins through length, flattery or other
tricks rather than quality). Use the note for anything else.
"""


# ---------------------------------------------------------------------------
# Connection and errors
# ---------------------------------------------------------------------------

_START_LOCAL = (
    "for a local server run `bash scripts/argilla-server.sh start` and "
    '`eval "$(bash scripts/argilla-server.sh env)"`; for your own Argilla (Docker, Hugging Face Spaces) '
    "export ARGILLA_API_URL=<its URL> and ARGILLA_API_KEY=<your key from its 'My settings' page>"
)


def connect(*, timeout: int = 60, retries: int = 2) -> rg.Argilla:
    """An Argilla client for ARGILLA_API_URL / ARGILLA_API_KEY, checked with one request.

    Raises TPODataError when a variable is unset, the server cannot be reached or
    the key is refused.
    """
    url = os.environ.get("ARGILLA_API_URL", "").strip()
    key = os.environ.get("ARGILLA_API_KEY", "").strip()
    missing = [name for name, value in (("ARGILLA_API_URL", url), ("ARGILLA_API_KEY", key)) if not value]
    if missing:
        raise TPODataError(f"{' and '.join(missing)} not set, so there is no Argilla server to talk to", _START_LOCAL)
    register(key)
    import argilla as rg

    with argilla_errors(url):
        return rg.Argilla(api_url=url, api_key=key, timeout=timeout, retries=retries)


@contextlib.contextmanager
def argilla_errors(url: str) -> Iterator[None]:
    """Turn SDK and network errors into TPODataError naming the problem and the fix (key scrubbed)."""
    import httpx
    from argilla._exceptions import ArgillaError
    from argilla._exceptions._api import ArgillaAPIError, ForbiddenError, UnauthorizedError
    from argilla._exceptions._client import ArgillaCredentialsError

    try:
        yield
    except TPODataError:
        raise
    except (ArgillaCredentialsError, UnauthorizedError):
        raise TPODataError(
            f"Argilla at {url} refused the API key (401 Unauthorized)",
            "set ARGILLA_API_KEY to the key of an owner or admin user (Argilla UI > My settings; for the local "
            'server: eval "$(bash scripts/argilla-server.sh env)")',
        ) from None
    except ForbiddenError as err:
        raise TPODataError(
            f"Argilla at {url} forbids this for the user of ARGILLA_API_KEY: {scrub(str(err))}",
            "use the key of an owner, or of an admin who is a member of the dataset's workspace",
        ) from None
    except httpx.TransportError as err:
        raise TPODataError(
            f"cannot reach Argilla at {url} ({type(err).__name__}: {scrub(str(err))})",
            f"check that the server is running and the URL is right; {_START_LOCAL}",
        ) from None
    except (ArgillaAPIError, ArgillaError) as err:
        raise TPODataError(
            f"Argilla at {url} answered with an error: {scrub(str(err))[:800]}",
            "check that ARGILLA_API_URL points at an Argilla 2.x server (the URL of the UI, without /api); "
            "the server log has the details",
        ) from None


def _url(client: rg.Argilla) -> str:
    return str(client.api_url)


# ---------------------------------------------------------------------------
# Dataset settings
# ---------------------------------------------------------------------------


def review_settings(client: rg.Argilla) -> rg.Settings:
    """Fields, questions and metadata of a review dataset."""
    import argilla as rg

    # Every property gets the client explicitly: without it the SDK builds a
    # process-wide default client from the environment at import time.
    return rg.Settings(
        guidelines=_GUIDELINES,
        fields=[
            rg.TextField(name, title=title, use_markdown=True, required=required, client=client)
            for name, title, required in _FIELDS
        ],
        questions=[
            rg.LabelQuestion(
                LABEL_QUESTION,
                labels=list(LABELS),
                title="Is the chosen response better?",
                required=True,
                client=client,
            ),
            rg.MultiLabelQuestion(
                FLAGS_QUESTION,
                labels=list(FLAGS),
                title="Flags (any flag drops the pair)",
                required=False,
                client=client,
            ),
            rg.TextQuestion(NOTE_QUESTION, title="Note", required=False, client=client),
        ],
        metadata=[
            rg.TermsMetadataProperty("category", client=client),
            rg.FloatMetadataProperty("score_gap", client=client),
            rg.IntegerMetadataProperty("chosen_length", client=client),
            rg.IntegerMetadataProperty("rejected_length", client=client),
            rg.FloatMetadataProperty("rho", client=client),
        ],
    )


def _signature(serialized: Mapping[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """What must match for records to fit: names, types, labels, required. Titles may differ."""

    def options(settings: Mapping[str, Any]) -> list[str] | None:
        found = settings.get("options")
        return [o["value"] for o in found] if found else None

    return {
        "field": {
            f["name"]: {"type": f["settings"]["type"], "required": f["required"]} for f in serialized["fields"]
        },
        "question": {
            q["name"]: {"type": q["settings"]["type"], "labels": options(q["settings"]), "required": q["required"]}
            for q in serialized["questions"]
        },
        "metadata property": {m["name"]: {"type": m["settings"]["type"]} for m in serialized["metadata"]},
    }


def settings_differences(expected: rg.Settings, actual: rg.Settings) -> list[str]:
    """Human-readable differences between the review settings and an existing dataset's."""
    want, have = _signature(expected.serialize()), _signature(actual.serialize())
    problems = []
    for kind in want:
        for name in sorted(want[kind].keys() - have[kind].keys()):
            problems.append(f"{kind} {name!r} is missing")
        for name in sorted(have[kind].keys() - want[kind].keys()):
            problems.append(f"unexpected {kind} {name!r}")
        for name in sorted(want[kind].keys() & have[kind].keys()):
            for attr, value in want[kind][name].items():
                if have[kind][name][attr] != value:
                    problems.append(f"{kind} {name!r} has {attr} {have[kind][name][attr]!r}, expected {value!r}")
    return problems


def default_dataset_name(store: LocalStore, version: str) -> str:
    """``tpo-<run folder>-<version>-<manifest digest>``.

    The digest of the version's manifest (which lists every file's sha256) makes the name
    one version's: every run's store is called ``store``, and two runs' ``iter-1`` must not
    share a review dataset, where one's answers would land on the other's pairs.
    """
    digest = store.manifest_sha256(version)[:10]
    return f"tpo-{Path(store.root).resolve().parent.name}-{version}-{digest}"


def _find_dataset(client: rg.Argilla, name: str, workspace: str | None) -> rg.Dataset | None:
    if workspace:
        ws = client.workspaces(workspace)
        if ws is None:
            names = ", ".join(w.name for w in client.workspaces) or "none"
            raise TPODataError(
                f"Argilla workspace {workspace!r} not found (workspaces: {names})",
                "pass an existing workspace, or create it in the Argilla UI or with rg.Workspace(name).create()",
            )
        candidates = list(ws.datasets)
    else:
        candidates = list(client.datasets)
    matches = [ds for ds in candidates if ds.name == name]
    if len(matches) > 1:
        found_in = ", ".join(ds.workspace.name for ds in matches)
        raise TPODataError(
            f"Argilla has several datasets named {name!r} (workspaces: {found_in})",
            "pass the workspace (--workspace)",
        )
    # Listed datasets come without their settings; get() loads them.
    return matches[0].get() if matches else None


# ---------------------------------------------------------------------------
# Push
# ---------------------------------------------------------------------------


def _review_order(gaps: Sequence[float | None], order: str, seed: int) -> list[int]:
    if order not in ORDERS:
        raise TPODataError(f"unknown order {order!r}", f"use one of: {', '.join(ORDERS)}")
    indices = list(range(len(gaps)))
    if order == "smallest_gap":
        # The judge was least sure about these; unknown gaps go last.
        indices.sort(key=lambda i: (gaps[i] is None, abs(gaps[i] or 0.0)))
    elif order == "random":
        random.Random(seed).shuffle(indices)
    return indices


def _text(value: Any) -> str | None:
    # Argilla refuses empty strings in fields; an absent optional field shows nothing.
    return value if isinstance(value, str) and value.strip() else None


PARSE_FAILURE_NOTE = ("*Parse failure: no thought/response separator, so the judge never saw it. "
                      "The whole output, which DPO trains on:*\n\n")


def review_fields(row: Mapping[str, Any]) -> dict[str, str | None]:
    """What the reviewer sees of a pair: instruction, and thought and response of each side.

    A side that did not parse (as rejected parse failures are) has no response of its own;
    its field shows the whole output, marked, so the reviewer judges what DPO trains on.
    """
    fields = {name: _text(row.get(name)) for name, _, _ in _FIELDS}
    for side in ("chosen", "rejected"):
        raw = _text((row.get(side) or [{}])[-1].get("content"))
        if fields[f"{side}_response"] is None and fields[f"{side}_thought"] is None and raw:
            fields[f"{side}_response"] = PARSE_FAILURE_NOTE + raw
    return fields


def _record(row: Mapping[str, Any]) -> rg.Record:
    import argilla as rg

    metadata = {
        "category": row.get("category"),
        "score_gap": row.get("score_gap"),
        "chosen_length": row.get("chosen_length"),
        "rejected_length": row.get("rejected_length"),
        "rho": row.get("rho"),
    }
    return rg.Record(
        id=str(row["instruction_id"]),
        fields=review_fields(row),
        metadata={k: v for k, v in metadata.items() if v is not None},
        suggestions=[rg.Suggestion(LABEL_QUESTION, "yes", agent="tpo-data judge", type="model")],
    )


def push_for_review(
    store: LocalStore,
    version: str,
    client: rg.Argilla,
    *,
    workspace: str | None = None,
    dataset_name: str | None = None,
    sample: int | None = None,
    order: str = "smallest_gap",
    seed: int = 0,
) -> rg.Dataset:
    """Create or update the Argilla review dataset of ``version`` and log its pairs.

    ``order`` sets the order of the records (``smallest_gap`` first: the pairs
    the judge was least sure about); ``sample`` keeps only the first N of that
    order. Pushing again upserts by ``instruction_id``: no duplicates, answers kept.
    """
    import argilla as rg

    if sample is not None and sample < 1:
        raise TPODataError(f"sample must be at least 1, got {sample}", "pass a positive --sample or leave it out")
    pairs = store.load(version, "pairs")
    if pairs.num_rows == 0:
        raise TPODataError(
            f"version {version} has no pairs to review (every instruction was dropped; "
            f"`tpo-data show {version} --store {shlex.quote(str(store.root))}` says why)",
            "review a version with pairs, or generate again with more instructions or samples",
        )
    ids = [str(i) for i in pairs["instruction_id"]]
    duplicated = sorted(i for i, n in Counter(ids).items() if n > 1)
    if duplicated:
        raise TPODataError(
            f"version {version} has several pairs for instruction_id {', '.join(duplicated[:5])}; "
            "Argilla record ids must be unique",
            "rebuild the pairs with one pair per instruction (see docs/SCHEMA.md)",
        )
    gaps = pairs["score_gap"] if "score_gap" in pairs.column_names else [None] * len(ids)
    to_review = pairs.select(_review_order(gaps, order, seed)[:sample])
    name = dataset_name or default_dataset_name(store, version)
    url = _url(client)
    with argilla_errors(url):
        settings = review_settings(client)
        dataset = _find_dataset(client, name, workspace)
        if dataset is None:
            if workspace is None and not len(client.workspaces):
                raise TPODataError(
                    f"Argilla at {url} has no workspace to create dataset {name!r} in",
                    "create one in the Argilla UI (or rg.Workspace('argilla').create()) and pass --workspace",
                )
            with warnings.catch_warnings():
                # "Workspace not provided. Using default workspace" is the intended behaviour.
                warnings.simplefilter("ignore")
                dataset = rg.Dataset(name, workspace=workspace, settings=settings, client=client).create()
        else:
            differences = settings_differences(settings, dataset.settings)
            if differences:
                raise TPODataError(
                    f"Argilla dataset {name!r} (workspace {dataset.workspace.name!r}) exists with other settings: "
                    + "; ".join(differences),
                    "push under a new name (--dataset_name), or delete that dataset in the Argilla UI "
                    "(Dataset settings > Delete) if its answers are not needed",
                )
            _refuse_answered_changes(dataset, to_review, name)
        records = [_record(row) for row in to_review]
        if records:
            # batch_size <= len(records) avoids the SDK's "batch size normalized" warning.
            dataset.records.log(records, batch_size=min(len(records), 256))
    return dataset


def _refuse_answered_changes(dataset: rg.Dataset, rows: datasets.Dataset, name: str) -> None:
    """Refuse to show other pairs in records that have answers: Argilla's upsert replaces a
    record's fields and keeps its answers, which would then be about pairs nobody saw."""
    shown = _shown_by_id(rows)
    changed = sorted(
        str(record.id) for record in dataset.records(with_responses=True, with_suggestions=False)
        if str(record.id) in shown and _shown(record.fields) != shown[str(record.id)]
        and any(True for _ in record.responses)  # submitted, draft or discarded: all were about the old pair
    )
    if changed:
        raise TPODataError(
            f"Argilla dataset {name!r} has answered records (submitted, draft or discarded) that show other "
            "pairs under the same ids "
            f"({len(changed)}, for example {', '.join(changed[:3])}): pushing would keep those answers "
            "on pairs their reviewers never saw",
            "push under a new name (--dataset-name), or leave it unset: each version gets its own dataset",
        )


# ---------------------------------------------------------------------------
# Pull
# ---------------------------------------------------------------------------


class Reviews(list):
    """Reviewed pairs, one dict per pair with at least one submitted answer::

        {"instruction_id": "...", "responses": [{"reviewer": "ann", "label": "no",
                                                  "flags": ["harmful"], "note": "..."}]}

    ``counts`` has ``pairs`` (in the version), ``in_argilla``, ``reviewed``,
    ``not_reviewed`` (in Argilla, no submitted answer) and ``missing`` (pairs of
    the version with no Argilla record: deleted there, or never pushed);
    ``missing_ids`` lists the latter.
    """

    def __init__(self, items: Sequence[dict[str, Any]], counts: dict[str, int], missing_ids: list[str], dataset: str):
        super().__init__(items)
        self.counts = counts
        self.missing_ids = missing_ids
        self.dataset = dataset


def pull_reviews(
    store: LocalStore,
    version: str,
    client: rg.Argilla,
    dataset_name: str | None = None,
    *,
    workspace: str | None = None,
) -> Reviews:
    """Submitted answers from the review dataset of ``version`` (see :class:`Reviews`).

    Raises TPODataError if the dataset does not exist or holds records that are
    not pairs of ``version`` (the dataset belongs to another version).
    """
    pairs = store.load(version, "pairs")
    ids = [str(i) for i in pairs["instruction_id"]]
    # What the reviewer saw must be this version's pair: ids alone repeat across versions
    # (iter-1 and iter-1-curated, a regenerated iter-1) pushed under one --dataset_name.
    shown = _shown_by_id(pairs)
    name = dataset_name or default_dataset_name(store, version)
    url = _url(client)
    with argilla_errors(url):
        dataset = _find_dataset(client, name, workspace)
        if dataset is None:
            raise TPODataError(
                f"no Argilla dataset named {name!r} at {url}",
                f"push the version first (`tpo-data argilla push {version} --store {shlex.quote(str(store.root))}`), "
                "or pass --dataset_name/--workspace",
            )
        reviewers: dict[Any, str] = {}
        in_argilla: set[str] = set()
        unknown: list[str] = []
        reviewed: dict[str, list[dict[str, Any]]] = {}
        for record in dataset.records(with_responses=True, with_suggestions=False):
            rid = str(record.id)
            if shown.get(rid) != _shown(record.fields):
                unknown.append(rid)
                continue
            in_argilla.add(rid)
            answers = _submitted_answers(record, client, reviewers)
            if answers:
                reviewed[rid] = answers
    if unknown:
        raise TPODataError(
            f"Argilla dataset {name!r} has {len(unknown)} record(s) that are not pairs of version {version} "
            f"(for example {', '.join(sorted(unknown)[:3])}: another id, or the same id showing another pair)",
            "pull with the version that was pushed to this dataset, or pass the right --dataset_name "
            "(left unset, each version gets its own dataset)",
        )
    missing = [i for i in ids if i not in in_argilla]
    counts = {
        "pairs": len(ids),
        "in_argilla": len(in_argilla),
        "reviewed": len(reviewed),
        "not_reviewed": len(in_argilla) - len(reviewed),
        "missing": len(missing),
    }
    items = [{"instruction_id": i, "responses": reviewed[i]} for i in ids if i in reviewed]
    return Reviews(items, counts, missing, name)


def _shown(fields: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


def _shown_by_id(pairs: datasets.Dataset) -> dict[str, dict[str, Any]]:
    """What a reviewer sees of each pair, by record id, to compare with a record's fields."""
    return {str(row["instruction_id"]): _shown(review_fields(row)) for row in pairs}


def _submitted_answers(record: rg.Record, client: rg.Argilla, reviewers: dict[Any, str]) -> list[dict[str, Any]]:
    """One dict per reviewer who submitted an answer on ``record``."""
    by_user: dict[Any, dict[str, Any]] = {}
    for response in record.responses:
        if getattr(response.status, "value", response.status) != "submitted":
            continue
        answer = by_user.setdefault(response.user_id, {"label": None, "flags": [], "note": None})
        if response.question_name == LABEL_QUESTION:
            answer["label"] = response.value
        elif response.question_name == FLAGS_QUESTION:
            answer["flags"] = sorted(response.value or [])
        elif response.question_name == NOTE_QUESTION:
            answer["note"] = scrub(response.value) if response.value else None
    from argilla._exceptions._api import ArgillaAPIError

    answers = []
    for user_id, answer in by_user.items():
        if user_id not in reviewers:
            try:
                user = client.users(id=user_id)
            except ArgillaAPIError:  # only owners may look users up; admins get the id
                user = None
            reviewers[user_id] = user.username if user else str(user_id)
        answers.append({"reviewer": reviewers[user_id], **answer})
    return sorted(answers, key=lambda a: a["reviewer"])


# ---------------------------------------------------------------------------
# Apply
# ---------------------------------------------------------------------------


def majority_label(responses: Sequence[Mapping[str, Any]]) -> str:
    """``yes``, ``no`` or ``tie``: the most frequent label; a split vote is ``tie``."""
    votes = Counter(r.get("label") for r in responses if r.get("label") in LABELS)
    if not votes:
        return "tie"
    (top, n), *rest = votes.most_common()
    return "tie" if rest and rest[0][1] == n else top


def decide(responses: Sequence[Mapping[str, Any]]) -> str:
    """Outcome of one reviewed pair: ``flagged`` if anyone flagged it, else :func:`majority_label`."""
    return "flagged" if any(r.get("flags") for r in responses) else majority_label(responses)


def flip_pair(row: Mapping[str, Any]) -> dict[str, Any]:
    """``row`` with chosen and rejected (and their thought/response/score/length columns) swapped."""
    flipped = dict(row)
    for a, b in _SWAPPED:
        if a in row and b in row:
            flipped[a], flipped[b] = row[b], row[a]
    if row.get("score_gap") is not None:
        flipped["score_gap"] = -row["score_gap"]
    return flipped


def _review_problem(review: Any) -> str | None:
    """What makes one reviews entry unusable, or None if it is well formed."""
    if not isinstance(review, Mapping):
        return "is not an object"
    if not isinstance(review.get("instruction_id"), (str, int)):
        return "has no instruction_id"
    responses = review.get("responses") or []
    if not isinstance(responses, list) or not all(isinstance(r, Mapping) for r in responses):
        return "has responses that are not a list of objects"
    for response in responses:
        if response.get("label") not in (*LABELS, None):
            return f"has the label {response.get('label')!r}, not one of {', '.join(LABELS)}"
        if not isinstance(response.get("flags") or [], list):
            return "has flags that are not a list"
    return None


def _check_reviews(reviews: Any, source: str) -> None:
    """Refuse reviews that are not shaped like :func:`pull_reviews`' (a hand edit gone wrong)."""
    fix = (
        f"correct {source}: every entry is "
        '{"instruction_id": "...", "responses": [{"label": "yes|no|tie", "flags": [...]}]}; '
        "or pull the answers again"
    )
    if not isinstance(reviews, (list, tuple)):
        raise TPODataError(f"the reviews in {source} are not a list", fix)
    for n, review in enumerate(reviews):
        problem = _review_problem(review)
        if problem:
            excerpt = json.dumps(review, default=str)[:200]
            raise TPODataError(f"entry reviews[{n}] in {source} {problem}: {excerpt}", fix)


def apply_reviews(
    store: LocalStore,
    version: str,
    reviews: Sequence[Mapping[str, Any]],
    *,
    on_no: str = "flip",
    new_version: str | None = None,
    source: str = "the reviews",
) -> str:
    """Write the curated copy of ``version`` as a new version and return its name.

    ``reviews`` is what :func:`pull_reviews` returns (or the ``reviews`` list of
    the JSON that ``tpo-data argilla pull`` writes), checked by :func:`_check_reviews`;
    ``source`` names where they came from in its errors. Every config other than
    ``pairs`` is copied unchanged.
    """
    import datasets

    if on_no not in ON_NO:
        raise TPODataError(f"unknown on_no {on_no!r}", f"use one of: {', '.join(ON_NO)}")
    _check_reviews(reviews, source)
    new_version = new_version or f"{version}-curated"
    store.check_new(new_version, "--new-version")
    parent = store.manifest(version)
    pairs = store.load(version, "pairs")
    ids = [str(i) for i in pairs["instruction_id"]]
    by_id: dict[str, list[Mapping[str, Any]]] = {}
    for review in reviews:
        by_id.setdefault(str(review["instruction_id"]), []).extend(review.get("responses") or [])
    unknown = sorted(by_id.keys() - set(ids))
    if unknown:
        raise TPODataError(
            f"{len(unknown)} reviewed pair(s) are not in version {version} (for example {', '.join(unknown[:3])})",
            "apply the reviews to the version they were pulled from",
        )

    outcomes: dict[str, list[str]] = {"yes": [], "no": [], "tie": [], "flagged": []}
    agreed = 0
    rows = []
    for i, row in enumerate(pairs):
        responses = by_id.get(ids[i])
        if not responses:
            rows.append(row)
            continue
        agreed += majority_label(responses) == "yes"
        outcome = decide(responses)
        outcomes[outcome].append(ids[i])
        if outcome == "yes":
            rows.append(row)
        elif outcome == "no" and on_no == "flip":
            rows.append(flip_pair(row))
    if not rows:
        # load_dataset cannot read an empty split back, and there is nothing to train on.
        raise TPODataError(
            f"the reviews drop all {len(ids)} pairs of version {version}; no curated version written",
            "check the pulled reviews (tie and any flag drop a pair; with --on_no drop so does no)",
        )
    curated = datasets.Dataset.from_list(rows, features=pairs.features)

    reviewed = sum(len(v) for v in outcomes.values())
    curation = {
        "reviewed": reviewed,
        "unreviewed_kept": len(ids) - reviewed,
        "kept_yes": len(outcomes["yes"]),
        "flipped_no": len(outcomes["no"]) if on_no == "flip" else 0,
        "dropped_no": len(outcomes["no"]) if on_no == "drop" else 0,
        "dropped_tie": len(outcomes["tie"]),
        "dropped_flagged": len(outcomes["flagged"]),
        "agreement": round(agreed / reviewed, 4) if reviewed else None,
        "on_no": on_no,
        "pairs_in": len(ids),
        "pairs_out": curated.num_rows,
        "ids": {k: v for k, v in outcomes.items() if v},
    }
    configs = {"pairs": curated}
    for name in sorted(parent.get("row_counts") or {}):
        if name != "pairs":
            configs[name] = store.load(version, name)
    lineage_keys = ("iteration", "parent_model", "recipe", "seed", "instruction_slice")
    manifest: dict[str, Any] = {k: parent[k] for k in lineage_keys if k in parent}
    manifest.update(parent_version=version, curation=curation)
    if "candidates" in configs:
        manifest["stats"] = card.compute_stats(configs["candidates"], curated)
    manifest["row_counts"] = {name: ds.num_rows for name, ds in configs.items()}
    store.write_version(new_version, configs, manifest, _curated_card(new_version, version, manifest), {},
                        flag="--new-version")
    return new_version


def _curated_card(new_version: str, version: str, manifest: Mapping[str, Any]) -> str:
    c = manifest["curation"]
    header = yaml.safe_dump(card.card_metadata(list(manifest["row_counts"])), sort_keys=False)
    agreement = "n/a (nothing reviewed)" if c["agreement"] is None else f"{c['agreement']:.1%}"
    no_rule = "flipped (chosen and rejected swapped)" if c["on_no"] == "flip" else "dropped"
    rows = [
        ("parent version", version),
        ("iteration", manifest.get("iteration")),
        ("pairs in parent", c["pairs_in"]),
        ("reviewed", c["reviewed"]),
        ("human-judge agreement (share of reviewed pairs answered yes)", agreement),
        ("kept: yes", c["kept_yes"]),
        ("flipped: no", c["flipped_no"]),
        ("dropped: no", c["dropped_no"]),
        ("dropped: tie", c["dropped_tie"]),
        ("dropped: flagged", c["dropped_flagged"]),
        ("kept unreviewed", c["unreviewed_kept"]),
        ("pairs out", c["pairs_out"]),
    ]
    table = "\n".join(["| | |", "|---|---|", *(f"| {k} | {'' if v is None else v} |" for k, v in rows)])
    text = "\n\n".join(
        [
            f"---\n{header}---",
            f"# TPO preference data, {new_version} (human-curated)",
            f"Version `{version}` after human review in Argilla. Reviewers saw the instruction, both responses "
            "and both thoughts, and answered whether the judge's chosen response is better. "
            "Rules: any flag drops the pair; majority label per pair (a split vote is a tie); "
            f"yes keeps it, no: {no_rule}, tie drops it; unreviewed pairs are kept unchanged. "
            "Other configs are copied unchanged from the parent version.",
            "```python\nfrom datasets import load_dataset\n"
            f'# revision: the tag this version was published under ("{new_version}" unless `--tag` named another)\n'
            f'pairs = load_dataset(REPO_ID, "pairs", revision="{new_version}", split="train")\n```',
            "## Review",
            table,
        ]
    )
    return scrub(text + "\n")

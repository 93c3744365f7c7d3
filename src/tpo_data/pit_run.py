"""``tpo-data pit-run`` (``bash scripts/pit.sh``): the whole PIT chain of one recipe, resumable.

Stages, in order (METHOD.md 2), each one an ordinary project command run as a child
process with the recipe (so each can also be run by hand, and no stage inherits another's
torch threads or distilabel workers):

==========  ===============================================================  =========================
stage       command                                                          finished when
==========  ===============================================================  =========================
prefs       ``pipelines/tpo.py --config <prefs.config>`` + section ``prefs:``  ``pipeline.preferences``
            (only when the recipe has that section)                           has its manifest
rows        ``pipelines/pit.py --stage rows``                                store version ``pit-sft-1``
sft         ``trainers/pit.py sft``                                          stamp in ``sft.output_dir``
reward      ``trainers/pit.py reward``                                       stamp in ``reward.output_dir``
rl-1        ``trainers/pit.py rl`` (round 1: y_ref from the data)            stamp in ``rl.output_dir``
refs-2      ``pipelines/pit.py --stage refs`` (y_ref sampled from the policy)  store version ``pit-rl-refs-2``
rl-2        ``trainers/pit.py rl`` + section ``rl2:`` (round 2)               stamp in ``rl2.output_dir``
eval        ``tpo-data pit-eval`` + section ``eval:``                          ``eval.output`` (JSON)
==========  ===============================================================  =========================

A stage is skipped when its marker exists, is newer than the markers of the stages it
reads, and was made with the recipe settings the stage reads now (its command, the
recipe's shared top-level keys and its own sections, hashed into ``pit_run.json``);
otherwise it runs (a model folder without a stamp, e.g. from a killed run, is simply
trained again). A store version is never rewritten: if one is older than its inputs, or
its settings changed, the run stops and names the folder to delete. Wall times go to ``<pipeline.output_dir>/pit_run.json``;
the end prints them and the evaluation.

Recipe sections read here besides those of the stages: ``prefs:`` (flags of the TPO
pipeline; ``config`` is its recipe), ``rl2:`` (flags on top of ``rl:`` for round 2),
``eval:`` (flags of ``tpo-data pit-eval``; ``store`` comes from the top level) and ``run:``
(``torch_threads``: ``OMP_NUM_THREADS`` of the in-process torch stages unless set already;
on a shared 2-core machine one thread per process trained twice as fast as two).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tpo_data.cli import read_recipe
from tpo_data.errors import TPODataError
from tpo_data.pit_training import RECIPE_SECTIONS, REFS_VERSION, SFT_VERSION, recipe_section
from tpo_data.secrets import register, scrub
from tpo_data.store import MANIFEST

log = logging.getLogger("tpo_data")

# Sections only pit-run reads (the stage commands read RECIPE_SECTIONS and the shared keys).
PIT_RUN_SECTIONS = ("prefs", "rl2", "eval", "run")
# What the rows stage reads of the pipeline section (the rest is the refs stage's engine and sampling).
ROWS_KEYS = ("preferences", "preferences_config", "preferences_split", "max_preferences", "holdout_size",
             "split_seed", "store", "sft_version")
# Pipeline keys that change where or how fast, not what.
_RUN_ONLY = ("stage", "output_dir", "input_batch_size")
STAMP = "pit_run_done.json"  # written into a model folder once its stage exited cleanly
TIMES = "pit_run.json"
MIN_TRAIN_ROWS = 32


@dataclass
class Stage:
    """One step of the chain: a command, the file that says it finished, and what it reads."""

    name: str
    command: list[str]
    marker: Path
    needs: list[str] = field(default_factory=list)
    stamp: bool = False  # the runner writes the marker (model folders); else the command does
    store_version: bool = False  # never rewritten: stale means "delete it yourself"
    env: dict[str, str] = field(default_factory=dict)  # set for the command unless already set
    settings: dict[str, Any] = field(default_factory=dict)  # the recipe parts the command reads
    reads: list[Path] = field(default_factory=list)  # files from outside the chain it reads

    @property
    def fingerprint(self) -> str:
        """What decides the stage's output: its command and the recipe parts it reads (not the
        interpreter, nor where the recipe file lies: its content is in ``settings``)."""
        args = [a for i, a in enumerate(self.command[1:]) if i == 0 or self.command[i] != "--config"]
        what = json.dumps([args, self.settings], sort_keys=True, default=str)
        return hashlib.sha256(what.encode()).hexdigest()[:16]


def _flags(section: dict[str, Any]) -> list[str]:
    """``{"a_b": 1}`` -> ``["--a_b", "1"]`` (keys kept as written: TRL uses _, argparse -),
    sorted, so that reordering a recipe section changes no stage's fingerprint."""
    out: list[str] = []
    for key, value in sorted(section.items()):
        if isinstance(value, bool):
            value = str(value).lower()
        if key == "hub_token":  # a stage's token: masked wherever its command is shown or recorded
            register(str(value))
        out += [f"--{key}", str(value)]
    return out


def _require(section: dict[str, Any], key: str, where: str, recipe: str) -> Any:
    if section.get(key) in (None, ""):
        raise TPODataError(f"{recipe}: section {where!r} has no {key!r}.",
                           f"Add `{key}:` to the {where} section (see recipes/pit-smollm2.yaml).")
    return section[key]


def _versions(recipe: str, shared: dict[str, Any], pipe: dict[str, Any],
              sections: dict[str, dict[str, Any]]) -> tuple[str, str]:
    """The store versions the pipeline writes, once every stage that reads them names the same."""
    pipeline = {**shared, **pipe}
    sft_version = pipeline.get("sft_version", SFT_VERSION)
    refs_version = pipeline.get("refs_version", REFS_VERSION)
    # What each reader gets: shared top-level keys, then its own section (as load_recipe merges them).
    readers = {name: {**shared, **sections[name]} for name in ("sft", "reward", "rl")}
    readers["rl2"] = {**shared, **sections["rl"], **sections["rl2"]}
    checks = [(name, "version", readers[name].get("version", SFT_VERSION), sft_version) for name in readers]
    checks += [("eval", "version", sections["eval"].get("version", SFT_VERSION), sft_version),
               ("rl2", "refs_version", readers["rl2"].get("refs_version", REFS_VERSION), refs_version)]
    for where, key, named, written in checks:
        if named != written:
            raise TPODataError(
                f"{recipe}: the pipeline writes {written}, but the {where} stage reads {key} {named}.",
                f"Set `{key}: {written}` at the top level (or in that stage's section) as well.")
    return sft_version, refs_version


def plan(recipe_path: str | Path, python: str | None = None) -> list[Stage]:
    """The stages of a recipe, in order."""
    recipe = str(recipe_path)
    data = read_recipe(recipe)
    py = python or sys.executable
    store = Path(data.get("store", "outputs/pit/store"))
    sections_known = (*RECIPE_SECTIONS, *PIT_RUN_SECTIONS)
    shared = {k: v for k, v in data.items() if k not in sections_known}
    # A misspelt section would leave its stage on defaults, or read as one with no output_dir:
    # named first. Mapping-valued settings such as model_init_kwargs are shared keys, named unlike any.
    typos = sorted(k for k, v in shared.items()
                   if isinstance(v, dict) and difflib.get_close_matches(k, sections_known, n=1, cutoff=0.75))
    if typos:
        raise TPODataError(f"{recipe}: unknown section(s) {', '.join(typos)}.",
                           f"Sections are {', '.join(sections_known)}: fix the name.")
    pipe = recipe_section(data, "pipeline", recipe)
    sections = {name: recipe_section(data, name, recipe) for name in ("sft", "reward", "rl", "rl2", "eval")}
    for name in ("sft", "reward", "rl", "rl2"):
        _require(sections[name], "output_dir", name, recipe)
    from tpo_data.pit_data import looks_like_hub_id

    named = str(_require(pipe, "preferences", "pipeline", recipe))
    preferences = Path(named)
    # A Hub dataset id (Anthropic/hh-rlhf) that is no local path: the rows stage reads it from the
    # local Hugging Face cache, and says how to fill the cache if it is not there.
    hub_id = looks_like_hub_id(named)
    sft_version, refs_version = _versions(recipe, shared, pipe, sections)
    stages: list[Stage] = []

    prefs = recipe_section(data, "prefs", recipe)
    if prefs:
        prefs = dict(prefs)
        tpo_config = prefs.pop("config", "recipes/tpo-smollm2.yaml")
        tpo_recipe = read_recipe(tpo_config, f"prefs.config in {recipe}")
        out = Path(_require(prefs, "output_dir", "prefs", recipe))
        version = f"iter-{prefs.get('iteration', tpo_recipe.get('iteration', 1))}"
        written = Path(prefs.get("store", out / "store")) / version
        if written.resolve() != preferences.resolve():
            raise TPODataError(
                f"{recipe}: the prefs stage writes {written}, but pipeline.preferences is {preferences}.",
                f"Set pipeline.preferences: {written}, or remove the prefs section.")
        stages.append(Stage("prefs", [py, "pipelines/tpo.py", "--config", tpo_config, *_flags(prefs)],
                            preferences / MANIFEST, store_version=True, settings={"config": tpo_recipe}))
    elif not hub_id and not (preferences / MANIFEST).is_file() and not preferences.is_file():
        hint = ("bash scripts/main.sh" if "tpo-smollm2" in str(preferences)
                else "the pipeline that writes it")
        raise TPODataError(
            f"The preference data {preferences} (pipeline.preferences in {recipe}) does not exist.",
            f"Produce it first ({hint}), point pipeline.preferences at a preference file, or add a "
            "prefs section that makes it (see recipes/pit-smollm2.yaml).")
    first = ["prefs"] if prefs else []
    run = recipe_section(data, "run", recipe)
    # In-process torch stages (not the vLLM ones: vLLM binds its own threads).
    torch_env = {"OMP_NUM_THREADS": str(run["torch_threads"])} if run.get("torch_threads") else {}

    # Without a prefs stage the preference data comes from outside: rewritten in place, it
    # must make pit-sft-1 stale as a redone prefs stage would.
    source = [] if prefs or hub_id else [preferences / MANIFEST if preferences.is_dir() else preferences]
    stages.append(Stage("rows", [py, "pipelines/pit.py", "--config", recipe, "--stage", "rows"],
                        store / sft_version / MANIFEST, needs=first, store_version=True,
                        settings={k: {**shared, **pipe}.get(k) for k in ROWS_KEYS}, reads=source))
    trainer = [py, "trainers/pit.py"]
    sft_dir, reward_dir = Path(sections["sft"]["output_dir"]), Path(sections["reward"]["output_dir"])
    rl1_dir, rl2_dir = Path(sections["rl"]["output_dir"]), Path(sections["rl2"]["output_dir"])
    stages.append(Stage("sft", [*trainer, "sft", "--config", recipe], sft_dir / STAMP, ["rows"], stamp=True,
                        env=torch_env, settings={**shared, "sft": sections["sft"]}))
    stages.append(Stage("reward", [*trainer, "reward", "--config", recipe], reward_dir / STAMP, ["rows"],
                        stamp=True, env=torch_env, settings={**shared, "reward": sections["reward"]}))
    stages.append(Stage("rl-1", [*trainer, "rl", "--config", recipe], rl1_dir / STAMP,
                        ["rows", "sft", "reward"], stamp=True, env=torch_env, settings={**shared, "rl": sections["rl"]}))
    # Round 2's references come from pipeline.model: the base policy, or a checkpoint of this run.
    by_dir = {sft_dir.resolve(): "sft", rl1_dir.resolve(): "rl-1"}
    refs_model = by_dir.get(Path(str(pipe.get("model", "embedded"))).resolve())
    stages.append(Stage("refs-2", [py, "pipelines/pit.py", "--config", recipe, "--stage", "refs"],
                        store / refs_version / MANIFEST, ["rows", *([refs_model] if refs_model else [])],
                        store_version=True, env=torch_env if pipe.get("engine") == "transformers" else {},
                        settings={**shared, **{k: v for k, v in pipe.items() if k not in _RUN_ONLY}}))
    stages.append(Stage("rl-2", [*trainer, "rl", "--config", recipe, *_flags(sections["rl2"])],
                        rl2_dir / STAMP, ["rl-1", "refs-2", "sft", "reward"], stamp=True, env=torch_env,
                        settings={**shared, "rl": sections["rl"]}))
    ev = dict(sections["eval"])
    output = Path(_require(ev, "output", "eval", recipe))
    ev.setdefault("store", str(store))
    stages.append(Stage("eval", [py, "-m", "tpo_data.cli", "pit-eval", *_flags(ev)],
                        output, ["rows", "reward", "rl-2"]))
    return stages


def _mtime(path: Path) -> float | None:
    return path.stat().st_mtime if path.is_file() else None


def is_done(stage: Stage, stages: dict[str, Stage], recorded: dict[str, Any] | None = None) -> bool:
    """Finished, newer than everything it reads, and (per ``recorded``, the run's pit_run.json)
    made with the settings it has now.

    Raises for a store version older than its inputs or made with other settings: store
    versions are never rewritten.
    """
    own = _mtime(stage.marker)
    if own is None:
        return False
    made_with = ((recorded or {}).get(stage.name) or {}).get("settings")
    if made_with is not None and made_with != stage.fingerprint:
        if stage.store_version:
            raise TPODataError(
                f"{stage.marker.parent} was made with other recipe settings for {stage.name} than the recipe has now.",
                f"Delete {stage.marker.parent} and rerun to rebuild it, or restore the recipe.")
        log.info("pit-run: %s: its recipe settings changed since it ran; redone", stage.name)
        return False
    inputs = {f"the output of {n}": _mtime(stages[n].marker) for n in stage.needs if n in stages}
    inputs.update({str(path): _mtime(path) for path in stage.reads})
    stale = [what for what, t in inputs.items() if t is not None and t > own]
    if not stale:
        return True
    if stage.store_version:
        raise TPODataError(
            f"{stage.marker.parent} is older than {', '.join(stale)}, which changed since it was made.",
            f"Delete {stage.marker.parent} and rerun, so that {stage.name} is rebuilt from the new data.")
    return False


def _train_rows(stage: Stage) -> int | None:
    try:
        return json.loads(stage.marker.read_text())["row_counts"]["train"]
    except (OSError, KeyError, ValueError):
        return None


def _record(times_path: Path, stage: Stage, seconds: float) -> None:
    times = json.loads(times_path.read_text()) if times_path.is_file() else {}
    times[stage.name] = {"seconds": round(seconds, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                         "command": scrub(" ".join(stage.command)), "settings": stage.fingerprint}
    times_path.parent.mkdir(parents=True, exist_ok=True)
    times_path.write_text(json.dumps(times, indent=2))


def run_chain(recipe: str | Path, only: str | None = None, dry_run: bool = False) -> int:
    """Run every unfinished stage of ``recipe`` in order (from the repository root)."""
    if not (Path("pipelines/pit.py").is_file() and Path("trainers/pit.py").is_file()):
        raise TPODataError("pit-run runs the project's pipelines/ and trainers/ scripts, which are not here.",
                           "Run it from the repository root (bash scripts/pit.sh does).")
    data = read_recipe(recipe)
    times_path = Path(recipe_section(data, "pipeline", recipe).get("output_dir", "outputs/pit")) / TIMES
    return run_stages(plan(recipe), times_path, only=only, dry_run=dry_run)


def run_stages(stages: list[Stage], times_path: Path, only: str | None = None, dry_run: bool = False) -> int:
    """Run the stages that are not done, in order; record their wall times in ``times_path``."""
    by_name = {s.name: s for s in stages}
    if only is not None and only not in by_name:
        raise TPODataError(f"Unknown stage {only!r}.", f"Use one of: {', '.join(by_name)}.")
    started = time.monotonic()
    ran: list[str] = []
    recorded = json.loads(times_path.read_text()) if times_path.is_file() else {}
    for stage in stages:
        if only is not None and stage.name != only:
            continue
        done = is_done(stage, by_name, recorded)
        if dry_run:
            print(f"{stage.name:7s} {'done' if done else 'to run'}: {scrub(' '.join(stage.command))}")
            continue
        if done:
            log.info("pit-run: %s is done (%s), skipped", stage.name, stage.marker)
            continue
        log.info("pit-run: %s: %s", stage.name, " ".join(stage.command))
        if stage.stamp:
            stage.marker.unlink(missing_ok=True)  # the folder is being retrained: not finished until it is
        t0 = time.monotonic()
        env = {**stage.env, **os.environ} if stage.env else None
        code = subprocess.run(stage.command, env=env).returncode
        seconds = time.monotonic() - t0
        if code != 0:
            raise TPODataError(f"Stage {stage.name} failed (exit status {code}) after {seconds:.0f} s.",
                               "Fix the error above and rerun; finished stages are skipped.")
        if stage.stamp:
            stage.marker.parent.mkdir(parents=True, exist_ok=True)
            stage.marker.write_text(scrub(json.dumps({"stage": stage.name, "command": stage.command,
                                                      "seconds": round(seconds, 1)}, indent=2)))
        elif not stage.marker.is_file():
            raise TPODataError(f"Stage {stage.name} exited cleanly but wrote no {stage.marker}.",
                               "Check the recipe's paths for this stage.")
        _record(times_path, stage, seconds)
        ran.append(stage.name)
        if stage.name == "rows":
            rows = _train_rows(stage)
            if rows is not None and rows < MIN_TRAIN_ROWS:
                log.warning("pit-run: only %d training rows in %s; results on so few are noise "
                            "(use more preference data)", rows, stage.marker.parent)
    if dry_run:
        return 0
    print(summary(stages, times_path, time.monotonic() - started, ran))
    return 0


def summary(stages: list[Stage], times_path: Path, seconds: float, ran: list[str]) -> str:
    """Wall time per stage (from the run that made it) and the evaluation report."""
    from tpo_data.pit_eval import format_report

    times = json.loads(times_path.read_text()) if times_path.is_file() else {}
    lines = [f"PIT chain: {len(ran)} stage(s) run now in {seconds / 60:.1f} min; wall time per stage "
             f"(when it ran, {times_path}):"]
    total = 0.0
    for stage in stages:
        t = times.get(stage.name, {}).get("seconds")
        total += t or 0.0
        note = "" if stage.name in ran else " (done earlier)"
        lines.append(f"  {stage.name:7s} {'?' if t is None else f'{t / 60:5.1f} min'}{note}")
    lines.append(f"  total   {total / 60:5.1f} min")
    report_path = stages[-1].marker
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    if stages[-1].name == "eval" and "pit_stop_rule" in report:
        lines += ["", f"Evaluation ({report_path}):", format_report(report)]
    return "\n".join(lines)


__all__ = ["Stage", "is_done", "plan", "run_chain", "run_stages", "summary"]

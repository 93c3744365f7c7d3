"""The TPO loop (``tpo-data iterate``): generate, judge, store, train, repeat (METHOD.md 1.7).

Iteration t, with generator M_{t-1} (M0 = the recipe's ``--model``):

1. data: M_{t-1} answers a fresh instruction slice with thoughts; the judge
   scores the responses; pairs are selected and stored as version ``iter-t``
   (:mod:`tpo_data.iteration`, the same stage as ``pipelines/tpo.py``);
   With ``--push_to_hub REPO`` the version is also published, tagged ``iter-t``;
2. curation (``--curation argilla``): the loop stops until the reviewed copy
   ``iter-t-curated`` exists (``tpo-data argilla push/pull/apply``) and then
   trains on it;
3. training: DPO of M_{t-1} on that version into ``<output_dir>/models/iter-t``
   (M_t), in a child process (``python -m tpo_data.cli train`` or the
   ``--launcher``, e.g. ``accelerate launch --num_processes 8``) with the DPO
   recipe ``--train_config``;
4. M_t becomes the generator of iteration t+1.

Every step is resumable and nothing is redone or overwritten: a version that
exists is kept, a model folder with ``lineage.json`` is finished, a training
run that died resumes from its last checkpoint, and the instruction ledger
never hands out an instruction twice. ``<output_dir>/lineage.json`` records
the chain (M_t came from iter-t, which came from M_{t-1}); ``tpo-data
versions`` prints it. ``--baseline`` runs the same loop without thoughts
(prompt ``direct``, whole output judged) in ``<output_dir>/direct``, the
paper's control; then ``tpo-data eval`` compares on held-out instructions.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tpo_data import hub
from tpo_data.engines import EngineArguments, SamplingArguments, check_one_model_per_endpoint
from tpo_data.errors import TPODataError
from tpo_data.instructions import InstructionArguments
from tpo_data.judges import JudgeArguments
from tpo_data.pipeline import RunArguments
from tpo_data.prompts import load_prompt
from tpo_data.store import LocalStore
from tpo_data.training import LINEAGE

log = logging.getLogger("tpo_data")

CURATION = ("none", "argilla")
LOOP_LINEAGE = "lineage.json"


@dataclass
class LoopArguments:
    """How many iterations, how each model is trained, and what else the loop runs."""

    iterations: int = field(default=2, metadata={"help": "TPO iterations to run (the paper: 4)."})
    train_config: str = field(
        default="recipes/dpo-smollm2.yaml",
        metadata={"help": "DPO recipe for every iteration's training (python trainers/dpo.py --config)."},
    )
    train_overrides: str = field(
        default="",
        metadata={"help": "Extra trainer flags, e.g. '--num_train_epochs 10 --irpo_alpha 1'; a single "
                  "flag needs the = form: --train_overrides=--use_peft."},
    )
    launcher: str = field(
        default="",
        metadata={"help": "Command that launches training, e.g. 'accelerate launch --num_processes 8' "
                  "(default: this Python)."},
    )
    curation: str = field(
        default="none",
        metadata={"help": "none, or argilla: stop after each version until its reviewed copy "
                  "iter-t-curated exists, then train on that.", "choices": list(CURATION)},
    )
    baseline: bool = field(
        default=False,
        metadata={"help": "Also run the direct-response control loop (no thoughts) in "
                  "<output_dir>/direct."},
    )
    evaluate: bool = field(
        default=True, metadata={"help": "Run the held-out evaluation (tpo-data eval) at the end."}
    )

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise TPODataError(f"--iterations {self.iterations} runs nothing.", "Pass --iterations 1 or more.")
        if self.curation not in CURATION:
            raise TPODataError(f"Unknown --curation {self.curation!r}.", f"Use one of: {', '.join(CURATION)}.")


def model_dir(output_dir: str | Path, iteration: int) -> Path:
    return Path(output_dir) / "models" / f"iter-{iteration}"


def baseline_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "direct"


def trained_models(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(t, folder) of every finished model M_t under ``output_dir``, by t."""
    found = []
    for folder in (Path(output_dir) / "models").glob("iter-*"):
        suffix = folder.name.removeprefix("iter-")
        if suffix.isdigit() and (folder / LINEAGE).is_file():
            found.append((int(suffix), folder))
    return sorted(found)


def generator(seed_model: str, output_dir: str | Path, iteration: int) -> str:
    """The model that generates iteration t: M0 for t = 1, else the finished M_{t-1}."""
    if iteration == 1:
        return seed_model
    previous = model_dir(output_dir, iteration - 1)
    if not (previous / LINEAGE).is_file():
        raise TPODataError(
            f"Iteration {iteration} needs M{iteration - 1} in {previous}, which is not trained yet.",
            "Run the loop from iteration 1 (tpo-data iterate resumes where it stopped).",
        )
    return str(previous)


def _same_data(out: Path, store: Path, version: str, parent: str) -> bool:
    """Whether the run in ``out`` started on ``version`` of ``store`` from ``parent`` (unknown:
    yes). A rerun with --curation trains on iter-t-curated: it must not resume iter-t's run."""
    from tpo_data.training import RESUME_DATA

    path = out / RESUME_DATA
    if not path.is_file():
        return True
    recorded = json.loads(path.read_text("utf-8"))
    return (recorded.get("version"), recorded.get("manifest_sha256"), recorded.get("parent_model")) == (
        version, LocalStore(store).manifest_sha256(version), parent)


def _launcher(loop: LoopArguments) -> list[str]:
    launcher = shlex.split(loop.launcher) if loop.launcher else [sys.executable]
    # "accelerate launch ...": this environment's accelerate, also when it is not on PATH.
    beside = Path(sys.executable).parent / launcher[0]
    if loop.launcher and os.sep not in launcher[0] and beside.is_file():
        launcher[0] = str(beside)
    return launcher


def check_training(loop: LoopArguments) -> None:
    """Before iteration 1 generates anything: the training recipe and launcher exist."""
    if not Path(loop.train_config).is_file():
        raise TPODataError(f"Training recipe {loop.train_config} does not exist (--train_config; a relative "
                           f"path is read from {Path.cwd()}).",
                           "Pass --train_config recipes/dpo-smollm2.yaml from the repository root, "
                           "or the path of your own DPO recipe.")
    program = _launcher(loop)[0]
    if not (shutil.which(program) or Path(program).is_file()):
        raise TPODataError(f"The training launcher {program!r} was not found (--launcher {loop.launcher!r}).",
                           "Install it in this environment (pip install accelerate) or fix --launcher.")


def train_command(loop: LoopArguments, store: Path, version: str, parent: str, out: Path) -> list[str]:
    """The training child process: resume a run that died, replace a folder with no checkpoint."""
    cmd = [*_launcher(loop), "-m", "tpo_data.cli", "train", "--config", loop.train_config,
           "--dataset_store", str(store), "--dataset_version", version, "--model", parent,
           "--output_dir", str(out)]
    # Complete checkpoints only: the Trainer writes trainer_state.json last, so a kill
    # mid-save leaves a folder without it, and resuming from that would fail every rerun.
    checkpoints = sorted((p for p in out.glob("checkpoint-*") if (p / "trainer_state.json").is_file()),
                         key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1)
    if checkpoints and _same_data(out, store, version, parent):
        cmd += ["--resume_from_checkpoint", str(checkpoints[-1])]
    elif out.is_dir() and any(out.iterdir()):
        cmd += ["--overwrite_output_dir", "true"]
    return cmd + shlex.split(loop.train_overrides)


def train(loop: LoopArguments, store: Path, version: str, parent: str, out: Path) -> None:
    cmd = train_command(loop, store, version, parent, out)
    log.info("Training %s on %s: %s", out.name, version, shlex.join(cmd))
    try:
        done = subprocess.run(cmd, check=False)
    except FileNotFoundError:
        raise TPODataError(
            f"The training launcher {cmd[0]!r} was not found (--launcher {loop.launcher!r}).",
            "Install it in this environment (pip install accelerate) or pass its full path in "
            "--launcher; the finished iterations are kept.",
        ) from None
    if done.returncode != 0 or not (out / LINEAGE).is_file():
        raise TPODataError(
            f"Training of {out} on {version} failed (exit status {done.returncode}); its error is "
            f"printed above. Version {version} and every earlier model are kept.",
            "Fix the cause and rerun the same command: the loop resumes with this training "
            "(from its last checkpoint, if one was saved).",
        )


def _check_trained_on(out: Path, store: LocalStore, version: str) -> None:
    """Refuse to reuse a finished model that was trained on other data than this run's ``version``."""
    dataset = json.loads((out / LINEAGE).read_text()).get("dataset", {})
    # Not the store's path: a moved output folder holds the same data (the sha says so).
    expected = {"version": version, "manifest_sha256": store.manifest_sha256(version)}
    differ = [key for key, value in expected.items() if dataset.get(key) != value]
    if differ:
        raise TPODataError(
            f"{out} is finished, but it was trained on {dataset.get('version')!r} of "
            f"{dataset.get('store')!r}, and this run trains it on {version} of {store.root} "
            f"({', '.join(differ)} differ{'s' if len(differ) == 1 else ''}).",
            "Rerun with the flags that trained it (--curation, --store), or remove "
            f"{out} to train it again; the generated versions are kept.",
        )


def _curated(store: LocalStore, version: str) -> str | None:
    curated = f"{version}-curated"
    return curated if curated in {m.get("version") for m in store.versions()} else None


def _wait_for_curation(store: LocalStore, version: str) -> None:
    root = shlex.quote(str(store.root))
    raise TPODataError(
        f"Version {version} waits for human review (--curation argilla).",
        f"Review it, then rerun this command: tpo-data argilla push {version} --store {root}; "
        f"label in Argilla; tpo-data argilla pull {version} --store {root}; "
        f"tpo-data argilla apply {version} --store {root} (writes {version}-curated).",
    )


def run_loop(instructions: InstructionArguments, engine: EngineArguments, sampling: SamplingArguments,
             run: RunArguments, judge: JudgeArguments, loop: LoopArguments) -> list[dict[str, Any]]:
    """Run or resume iterations 1..N; return and save the lineage, one entry per iteration."""
    from tpo_data.iteration import require_pairs_possible, run_generation, summarize_generation, write_pairs
    from tpo_data.pair_data import format_stats

    if judge.judge == "none":
        raise TPODataError("The loop trains on judged pairs, and the recipe sets --judge none.",
                           "Pass --judge pairwise or --judge reward_model.")
    require_pairs_possible(sampling)
    if any(not (model_dir(run.output_dir, t) / LINEAGE).is_file() for t in range(1, loop.iterations + 1)):
        check_training(loop)  # a finished loop rerun (to evaluate, say) trains nothing
    if loop.iterations > 1:
        check_one_model_per_endpoint(engine, f"iterations 2..{loop.iterations} generate with the models "
                                     "the loop trains (M1, M2, ...)")
    hub.check_push_to_hub(run.push_to_hub, judged=True)
    store = LocalStore(run.store_dir())
    lineage: list[dict[str, Any]] = []
    for t in range(1, loop.iterations + 1):
        start = time.perf_counter()
        parent = generator(engine.model, run.output_dir, t)
        out = model_dir(run.output_dir, t)
        version = f"iter-{t}"
        log.info("[bold]Iteration %d[/bold]: %s generates %s", t, parent, version,
                 extra={"markup": True})
        step_run = replace(run, iteration=t)
        step_engine = replace(engine, model=parent)
        result = run_generation(instructions, step_engine, sampling, step_run, judge)
        print(summarize_generation(result))
        stats = write_pairs(result, load_prompt(run.thought_prompt), step_engine, sampling, step_run, judge)
        print(format_stats(stats))
        if run.push_to_hub:
            print(hub.push_iteration(store, version, run.push_to_hub, private=run.hub_private))
        train_on = version
        if loop.curation == "argilla":
            train_on = _curated(store, version) or _wait_for_curation(store, version)
            if run.push_to_hub:  # what M_t learns from is published beside what M_t-1 generated
                print(hub.push_iteration(store, train_on, run.push_to_hub, private=run.hub_private))
        if (out / LINEAGE).is_file():
            _check_trained_on(out, store, train_on)
        else:
            train(loop, store.root, train_on, parent, out)
        lineage.append({
            "iteration": t, "generator": parent, "version": version, "trained_on": train_on,
            "model": str(out), "parse_rate": result.parse_rate,
            "pairs": stats.get("pairs_kept"), "seconds_this_run": round(time.perf_counter() - start, 1),
        })
        write_lineage(run.output_dir, engine.model, lineage)
    return lineage


def write_lineage(output_dir: str | Path, seed_model: str, entries: list[dict[str, Any]]) -> None:
    """Merge ``entries`` into ``<output_dir>/lineage.json`` (earlier iterations are kept)."""
    path = Path(output_dir) / LOOP_LINEAGE
    known = json.loads(path.read_text())["iterations"] if path.is_file() else []
    merged = {e["iteration"]: e for e in known}
    for entry in entries:
        merged[entry["iteration"]] = {**merged.get(entry["iteration"], {}), **entry}
    path.write_text(json.dumps({"seed_model": seed_model,
                                "iterations": [merged[t] for t in sorted(merged)]}, indent=2))


def read_lineage(output_dir: str | Path) -> dict[str, Any] | None:
    path = Path(output_dir) / LOOP_LINEAGE
    return json.loads(path.read_text()) if path.is_file() else None


def format_lineage(lineage: dict[str, Any]) -> str:
    lines = [f"M0 = {lineage['seed_model']}"]
    for e in lineage["iterations"]:
        trained = e.get("trained_on", e["version"])
        lines.append(f"{e['version']} <- generated by {e['generator']}; "
                     f"M{e['iteration']} = {e['model']} <- trained on {trained}")
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str | None = None) -> dict[str, Any]:
    """``tpo-data iterate``: the recipe's arguments plus :class:`LoopArguments` and the eval's."""
    from tpo_data.cli import parse_recipe, recipe_parser
    from tpo_data.evaluation import EvalArguments, evaluate, format_summary
    from tpo_data.iteration import ARGUMENT_TYPES

    parser = recipe_parser((*ARGUMENT_TYPES, LoopArguments, EvalArguments), prog)
    instructions, engine, sampling, run, judge, loop, eval_args = parse_recipe(parser, argv)
    if run.iteration != 1:
        raise TPODataError(f"tpo-data iterate runs iterations 1..--iterations itself; --iteration "
                           f"{run.iteration} (one iteration of generate) would be ignored.",
                           "Drop --iteration (a rerun resumes where the loop stopped), or raise --iterations.")
    if loop.evaluate:  # before any training: the evaluation would refuse only at the end
        check_one_model_per_endpoint(engine, "the evaluation compares M0 with the models the loop trains")
    started = time.perf_counter()
    lineage = run_loop(instructions, engine, sampling, run, judge, loop)
    if loop.baseline:
        log.info("[bold]Direct-response baseline loop[/bold] in %s", baseline_dir(run.output_dir),
                 extra={"markup": True})
        # The control's versions stay local: they are not iterations of the published dataset.
        direct = replace(run, output_dir=str(baseline_dir(run.output_dir)), thought_prompt="direct",
                         store=None, push_to_hub=None)
        run_loop(instructions, engine, sampling, direct, judge, loop)
    print(format_lineage(read_lineage(run.output_dir)))
    report = None
    if loop.evaluate:
        report = evaluate(instructions, engine, sampling, run, judge, eval_args)
        print(format_summary(report))
    print(f"Loop finished in {time.perf_counter() - started:.0f} s")
    return {"lineage": lineage, "report": report}


def eval_main(argv: list[str] | None = None, prog: str | None = None) -> dict[str, Any]:
    """``tpo-data eval``: the recipe's arguments plus the eval's."""
    from tpo_data.cli import parse_recipe, recipe_parser
    from tpo_data.evaluation import EvalArguments, evaluate, format_summary
    from tpo_data.iteration import ARGUMENT_TYPES

    parser = recipe_parser((*ARGUMENT_TYPES, EvalArguments), prog)
    # The loop's recipe evaluates too: its loop keys are not for this command.
    instructions, engine, sampling, run, judge, eval_args = parse_recipe(parser, argv, also_reads=(LoopArguments,))
    report = evaluate(instructions, engine, sampling, run, judge, eval_args)
    print(format_summary(report))
    return report

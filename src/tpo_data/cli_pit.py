"""``tpo-data improve`` and ``tpo-data pit-eval``: use and evaluate a trained PIT model.

``improve`` rewrites one answer repeatedly with the PIT model and keeps a rewrite only
when the gap reward model says it beats the previous answer; it stops at the first
rewrite that does not (or after ``--max-rounds``) and prints every round with its gap
score, then the best answer. Without ``--answer`` the first answer comes from
``--policy`` (default: the PIT model answering the instruction directly).

``pit-eval`` runs :func:`tpo_data.pit_eval.evaluate` on the held-out ``test`` rows of a
PIT store version: PIT per round, PIT with the stop rule, and Self-Refine of the policy
(feedback, then a rewrite with it: 3 calls for one round against PIT's 2), judged by an independent point-wise reward model
(``--judge reward_model``) or a pair-wise LLM judge (``--judge pairwise``: the TPO judge
prompt, both orders, forced verdicts; e.g. ``--judge-model embedded``). With ``--output
report.json`` the answers and verdicts of every batch are saved in ``report.calls.jsonl``:
rerunning the same command after a crash or Ctrl-C asks the models only for what is missing.

``pit-run`` runs the whole chain of a recipe, skipping finished stages (:mod:`tpo_data.pit_run`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tpo_data.errors import TPODataError


def _add_generation(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pit-model", required=True, help="PIT model folder (trainers/pit.py sft or rl output)")
    parser.add_argument("--reward-model", required=True, help="gap reward model folder (trainers/pit.py reward)")
    parser.add_argument("--policy", help="model that writes the first answer y_0 (default: the PIT model itself)")
    parser.add_argument("--temperature", type=float, default=0.5, help="sampling temperature (paper: 0.4-0.6)")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling top-p")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="tokens per answer at most")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--threshold", type=float, default=0.0,
                        help="a rewrite is kept only when its gap over the last answer is above this")
    parser.add_argument("--engine", choices=("transformers", "vllm"), default="transformers",
                        help="transformers: in process; vllm: one vLLM server per distinct model "
                             "(much faster on CPU for the pair-wise judge; needs .venv-vllm)")
    parser.add_argument("--vllm-port", type=int, default=8031, help="port of the first vLLM server")
    parser.add_argument("--vllm-gpu-memory-utilization", type=float,
                        help="GPU: the share of GPU memory each vLLM server may take; the servers run at "
                             "once, so on one GPU e.g. 0.3 for three models (default: vLLM's, 0.9)")


def add_cli(subparsers: Any) -> None:
    """Register ``improve`` and ``pit-eval`` on an argparse subparsers object."""
    from tpo_data.cli import RawHelpFormatter  # cli imports this module

    improve = subparsers.add_parser(
        "improve", help="Improve an answer repeatedly with a PIT model.", description=__doc__,
        formatter_class=RawHelpFormatter)
    improve.add_argument("--instruction", required=True, help="the instruction (user request)")
    improve.add_argument("--answer", help="the answer to improve (default: --policy writes one)")
    improve.add_argument("--max-rounds", type=int, default=3,
                         help="improvement rounds at most; it stops earlier once the gap reward says no gain")
    improve.add_argument("--json", action="store_true", help="print JSON instead of text")
    _add_generation(improve)
    improve.set_defaults(func=_cmd_improve)

    evaluate = subparsers.add_parser(
        "pit-eval", help="Evaluate PIT against Self-Refine on held-out items.", description=__doc__,
        formatter_class=RawHelpFormatter)
    evaluate.add_argument("--judge-model", required=True,
                          help="the judge (must not be the gap reward model): a point-wise reward model, "
                               "or with --judge pairwise an LLM ('embedded', a folder or a cached Hub id)")
    evaluate.add_argument("--judge", choices=("reward_model", "pairwise"), default="reward_model",
                          help="reward_model: point-wise scores; pairwise: an LLM compares both orders")
    evaluate.add_argument("--judge-max-new-tokens", type=int, default=128,
                          help="pairwise: tokens per judgment (a verdict is forced after them if missing)")
    evaluate.add_argument("--store", required=True, help="store folder holding the PIT version")
    evaluate.add_argument("--version", default="pit-sft-1", help="version with a 'test' config")
    evaluate.add_argument("--self-refine-model",
                          help="Self-Refine model: asked for feedback on the answer, then to rewrite it "
                               "with that feedback (default: --policy; 'none' skips it)")
    evaluate.add_argument("--max-items", type=int, default=16,
                          help="held-out instructions to evaluate (one item each, however many rows it has)")
    evaluate.add_argument("--rounds", type=int, default=2, help="improvement rounds of PIT and Self-Refine")
    evaluate.add_argument("--output", help="also write the report as JSON to this file; every answer and "
                          "verdict is kept beside it (report.json -> report.calls.jsonl), so a rerun resumes")
    _add_generation(evaluate)
    evaluate.set_defaults(func=_cmd_eval)

    run = subparsers.add_parser(
        "pit-run", help="Run the whole PIT chain of a recipe, skipping finished stages.",
        description=_pit_run_doc(), formatter_class=RawHelpFormatter)
    run.add_argument("--config", default="recipes/pit-smollm2.yaml", help="the PIT recipe")
    run.add_argument("--only", help="run only this stage, unless it is done (its inputs must exist)")
    run.add_argument("--dry-run", action="store_true", help="print the stages and whether they are done")
    run.set_defaults(func=_cmd_run)


def _pit_run_doc() -> str:
    from tpo_data import pit_run

    return pit_run.__doc__ or ""


def _cmd_run(args: argparse.Namespace) -> int:
    from tpo_data.pit_run import run_chain

    return run_chain(args.config, only=args.only, dry_run=args.dry_run)


def _models(args: argparse.Namespace, log_dir: str | Path, ledger: Any = None):
    from tpo_data.pit_eval import LocalModels

    return LocalModels(args.engine, vllm_port=args.vllm_port, log_dir=log_dir, seed=args.seed, ledger=ledger,
                       gpu_memory_utilization=args.vllm_gpu_memory_utilization)


def _chat(args: argparse.Namespace, models: Any, model: str, what: str):
    return models.chat(model, what, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_p=args.top_p)


def _check_rounds(value: int, flag: str) -> None:
    if value < 1:
        raise TPODataError(f"{flag} must be at least 1 (got {value}).", f"Pass {flag} 1 or more.")


def _cmd_improve(args: argparse.Namespace) -> int:
    from tpo_data.pit_eval import improve_many
    from tpo_data.pit_training import GapRewardModel

    _check_rounds(args.max_rounds, "--max-rounds")
    gap_model = GapRewardModel(args.reward_model)  # cheap checks first: fail before loading the LM
    with _models(args, Path(args.pit_model).parent) as models:
        pit = _chat(args, models, args.pit_model, "--pit-model")
        answer = args.answer
        if answer is None:
            policy = pit if not args.policy else _chat(args, models, args.policy, "--policy")
            answer = policy([[{"role": "user", "content": args.instruction}]])[0]
        result = improve_many([args.instruction], [answer], pit, gap_model, args.max_rounds, args.threshold)[0]
    if args.json:
        print(json.dumps({"instruction": result.instruction, "initial": result.initial,
                          "rounds": [{"round": i + 1, "answer": a, "gap": g, "kept": k} for i, (a, g, k)
                                     in enumerate(zip(result.rewrites, result.gaps, result.kept))],
                          "best": result.best}, indent=2))
        return 0
    print(f"round 0 (initial answer):\n{result.initial}\n")
    for i, (text, gap, kept) in enumerate(zip(result.rewrites, result.gaps, result.kept), 1):
        verdict = "kept" if kept else "not better, stopped"
        print(f"round {i}: gap over the last answer {gap:+.4f} ({verdict})\n{text}\n")
    print("(gap = R(x, new, last) - R(x, last, last): above the threshold means better)")
    print(f"best answer ({sum(result.kept)} kept rewrite(s)):\n{result.best}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from tpo_data.pit_eval import CallLedger, evaluate, format_report
    from tpo_data.pit_training import TEST, GapRewardModel, load_rows, model_path
    from tpo_data.reward_models import RewardModelScorer

    _check_rounds(args.rounds, "--rounds")
    if Path(args.judge_model).resolve() == Path(args.reward_model).resolve():
        raise TPODataError("--judge-model is the gap reward model PIT was trained against.",
                           "Judge with an independent point-wise reward model or LLM judge.")
    # Items are instructions (y_0 comes from the policy): one per instruction, however many
    # preference rows it had.
    instructions = list(dict.fromkeys(load_rows(args.store, args.version, TEST)["instruction"]))[: args.max_items]
    gap_model = GapRewardModel(args.reward_model)
    if args.judge == "reward_model":
        judge: Any = RewardModelScorer(model_path(args.judge_model, "--judge-model"))
    log_dir = Path(args.output).parent if args.output else Path(args.store)
    ledger = CallLedger(Path(args.output).with_suffix(".calls.jsonl") if args.output else None)
    with _models(args, log_dir, ledger) as models:
        if args.judge == "pairwise":
            judge = models.judge(args.judge_model, "--judge-model", max_new_tokens=args.judge_max_new_tokens)
        pit = _chat(args, models, args.pit_model, "--pit-model")
        policy = _chat(args, models, args.policy, "--policy") if args.policy else pit
        refine_name = args.self_refine_model
        refiner = None if refine_name == "none" else policy if not refine_name else _chat(
            args, models, refine_name, "--self-refine-model")
        initial = policy([[{"role": "user", "content": x}] for x in instructions])
        report = evaluate(instructions, initial, pit, gap_model, judge, refiner, args.rounds, args.threshold)
    report.update(pit_model=args.pit_model, policy=args.policy or args.pit_model,
                  self_refine_model=None if refiner is None else (refine_name or args.policy or args.pit_model),
                  judge_model=args.judge_model, judge=args.judge, reward_model=args.reward_model,
                  temperature=args.temperature, max_new_tokens=args.max_new_tokens, engine=args.engine)
    if args.judge == "pairwise":
        report["judge_calls"] = {"calls": judge.calls, "forced": judge.forced, "undecided": judge.undecided,
                                 "pairs": judge.pairs, "decided": judge.decided}
    print(format_report(report))
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=2))
        tmp.replace(out)  # written whole or not at all: pit-run treats the file as "done"
    return 0

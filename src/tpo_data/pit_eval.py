"""PIT inference (repeated improvement with a stop rule) and its evaluation.

Inference (METHOD.md 2.5): y_k = PIT(x, y_{k-1}), starting from the policy's answer
y_0. After each rewrite the gap reward model scores R(x, y_k, y_{k-1}) - R(x, y_{k-1}, y_{k-1})
(:meth:`~tpo_data.pit_training.GapRewardModel.calibrated_gap`: 0 means "no better"); a
rewrite is kept only when that gap is above the threshold, and the loop stops at the first rewrite
that is not better, or after ``max_rounds`` (:func:`tpo_data.pit.should_stop`). The
result is the last kept answer, which by construction beat every answer before it.

Evaluation (:func:`evaluate`), on held-out instructions, with a judge that is NOT the gap
reward model: any point-wise :class:`~tpo_data.reward_models.RewardModelScorer`, or a
pair-wise LLM judge (:class:`PairwiseLLMJudge`, the TPO judge prompt, both orders):

- per round k (every item rewritten k times, no stop rule): the share of y_k that beat
  the answer they improved, y_{k-1}, and the share that beat y_0;
- the same for Self-Refine (the comparison model's feedback on the answer, then its
  rewrite with that feedback: two calls per round, so 3 per item for one round against
  PIT's 2, as METHOD.md 2 compares them);
- the PIT answer chosen by the stop rule against y_0, with its mean call count.

A win is a strictly higher judge score; a tie counts one half (identical rewrites are common
with small models, and counting them as losses would understate both methods alike). A
pair-wise judge compares each pair in both orders: winning both is 1, one order and a
tie or unusable verdict in the other 3/4, split or tied 1/2 (as ``tpo-data eval``); an
unchanged answer is a tie without a judge call.

Resuming: with a :class:`CallLedger` (``pit-eval --output report.json`` keeps it in
``report.calls.jsonl``) the answers and pair-wise verdicts of every batch are saved when
it ends, so a rerun after a crash or Ctrl-C asks the models only for what is missing, and
the file holds every rewrite for inspection.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tpo_data.errors import TPODataError
from tpo_data.files import read_jsonl_log
from tpo_data.pit import improvement_messages, should_stop

# Self-Refine (Madaan et al. 2023), the baseline METHOD.md 2 compares PIT with: the model
# criticises its answer, then rewrites it using that feedback. Two calls per round, so with
# the first answer 3 calls against PIT's 2.
SELF_REFINE_FEEDBACK_PROMPT = (
    "Here is an instruction and an answer to it. Give specific, actionable feedback on how the "
    "answer could be more helpful, more accurate and harmless. Do not rewrite the answer.\n\n"
    "Instruction:\n{instruction}\n\nAnswer:\n{answer}"
)
SELF_REFINE_PROMPT = (
    "Here is an instruction, an answer to it and feedback on that answer. Improve the answer "
    "using the feedback. Reply with the improved answer only.\n\n"
    "Instruction:\n{instruction}\n\nAnswer:\n{answer}\n\nFeedback:\n{feedback}"
)


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def self_refine_round(model: Any, instructions: Sequence[str], answers: Sequence[str]) -> list[str]:
    """One Self-Refine round: ``model``'s feedback on every answer, then its rewrite with it."""
    feedback = model([_user(SELF_REFINE_FEEDBACK_PROMPT.format(instruction=x, answer=y))
                      for x, y in zip(instructions, answers)])
    return model([_user(SELF_REFINE_PROMPT.format(instruction=x, answer=y, feedback=f))
                  for x, y, f in zip(instructions, answers, feedback)])


def pit_round(model: Any, instructions: Sequence[str], answers: Sequence[str]) -> list[str]:
    """One PIT round: one rewrite of every answer."""
    return model([improvement_messages(x, y) for x, y in zip(instructions, answers)])


class CallLedger:
    """Model outputs of one evaluation, one JSON line per call, appended as each batch ends.

    A call's key hashes who answered (:func:`~tpo_data.models.model_fingerprint`: model folder,
    weights, sampling), the input, and how many times this run asked that same input before:
    a prompt asked twice (PIT's first round, then again under the stop rule) stays two samples,
    and a rerun, asking in the same order, finds both. ``path`` None keeps nothing on disk.
    """

    def __init__(self, path: Path | None):
        self.path = path
        self.done: dict[str, Any] = {e["key"]: e["value"] for e in read_jsonl_log(path)} if path else {}
        self.asked: Counter[str] = Counter()

    def run(self, who: str, inputs: Sequence[Any], compute: Callable[[list[Any]], list[Any]]) -> list[Any]:
        """``compute`` on the inputs without a saved output; every output, in input order."""
        keys = []
        for item in inputs:
            base = hashlib.sha256(json.dumps([who, item]).encode()).hexdigest()
            keys.append(f"{base}-{self.asked[base]}")
            self.asked[base] += 1
        missing = [i for i, key in enumerate(keys) if key not in self.done]
        if missing:
            values = compute([inputs[i] for i in missing])
            for i, value in zip(missing, values, strict=True):
                self.done[keys[i]] = value
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a", encoding="utf-8") as fh:
                    # ASCII (escaped): a write cut short cannot split a character and spoil the file.
                    fh.writelines(json.dumps({"key": keys[i], "who": who, "input": inputs[i],
                                              "value": self.done[keys[i]]}) + "\n" for i in missing)
        return [self.done[key] for key in keys]


class ChatModel:
    """A chat model answering message lists in batches: any loaded distilabel LLM (in-process
    ``BatchedTransformersLLM`` or an ``OpenAILLM`` on a vLLM server), see :class:`LocalModels`.
    With a ``ledger``, answers saved there under ``who`` are reused instead of generated."""

    def __init__(self, llm: Any, name: str = "", ledger: CallLedger | None = None, who: str = ""):
        self.llm, self.name, self.who = llm, name, who or name
        self.ledger = ledger or CallLedger(None)

    def __call__(self, conversations: Sequence[list[dict[str, str]]]) -> list[str]:
        return self.ledger.run(self.who, list(conversations), self._generate)

    def _generate(self, conversations: list[list[dict[str, str]]]) -> list[str]:
        llm = _loaded(self.llm)
        outputs = llm.generate_outputs(inputs=conversations, num_generations=1, **llm.get_generation_kwargs())
        return [((out.get("generations") or [None])[0] or "").strip() for out in outputs]


class _Deferred:
    """A model that ``load()`` loads on first :meth:`get`. It forwards nothing: library code
    checks types (``judges`` takes an ``OpenAILLM`` apart from other engines), so a proxy that
    passed for the model there would change behaviour silently; a missed :func:`_loaded` fails loudly.
    """

    def __init__(self, load: Callable[[], Any]):
        self._load, self._model = load, None

    def get(self) -> Any:
        if self._model is None:
            self._model = self._load()
        return self._model


def _loaded(llm: Any) -> Any:
    return llm.get() if isinstance(llm, _Deferred) else llm


class LocalModels:
    """Loads the models of ``improve``/``pit-eval``: in process (``engine="transformers"``), or
    each distinct model on a vLLM server of its own (``"vllm"``, ports from ``vllm_port`` up),
    shared by every use of that model (policy, Self-Refine, judge). Servers stop on exit."""

    def __init__(self, engine: str = "transformers", *, vllm_port: int = 8031, log_dir: str | Path = ".",
                 seed: int = 0, ledger: CallLedger | None = None, gpu_memory_utilization: float | None = None):
        from contextlib import ExitStack

        from tpo_data.engines import EngineArguments

        if engine not in ("transformers", "vllm"):
            raise TPODataError(f"Unknown engine {engine!r}.", "Use transformers or vllm.")
        self.engine, self.vllm_port, self.log_dir, self.seed = engine, vllm_port, Path(log_dir), seed
        # Every model's engine settings but its path and port; checked here, before any work.
        self._engine_args = EngineArguments(engine=engine, vllm_gpu_memory_utilization=gpu_memory_utilization)
        self.ledger = ledger or CallLedger(None)
        self.stack = ExitStack()
        self.servers: dict[str, tuple[str | None, str | None]] = {}

    def __enter__(self) -> LocalModels:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stack.close()

    def chat(self, model: str, what: str, *, max_new_tokens: int = 256, temperature: float = 0.5,
             top_p: float = 0.95) -> ChatModel:
        path = self._path(model, what)
        settings = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
        return ChatModel(self._llm(path, settings), model, self.ledger, self._who(path, what, settings))

    def judge(self, model: str, what: str, *, max_new_tokens: int) -> PairwiseLLMJudge:
        """A greedy pair-wise LLM judge on ``model`` (see :class:`PairwiseLLMJudge`)."""
        path = self._path(model, what)
        settings = {"max_new_tokens": max_new_tokens, "temperature": 0.0, "top_p": 1.0}
        return PairwiseLLMJudge(self._llm(path, settings), model, ledger=self.ledger,
                                who=self._who(path, what, settings))

    @staticmethod
    def _path(model: str, what: str) -> str:
        # Once per model use, and now: a wrong path fails before any work, and resolving
        # "embedded" hashes its weight files.
        from tpo_data.pit_training import model_path

        return model_path(model, what)

    def _llm(self, path: str, settings: dict[str, Any]) -> Any:
        """A distilabel LLM for ``path`` with these sampling settings, loaded (and its vLLM server
        started) when first used: a rerun whose calls are all in the ledger starts nothing."""
        return _Deferred(lambda: self._load(path, **settings))

    def _load(self, path: str, max_new_tokens: int, temperature: float, top_p: float) -> Any:
        from tpo_data.engines import SamplingArguments, build_llm
        from tpo_data.pipeline import start_endpoint

        engine = replace(self._engine_args, model=path, vllm_port=self.vllm_port + len(self.servers))
        sampling = SamplingArguments(num_samples=1, temperature=temperature, top_p=top_p,
                                     max_new_tokens=max_new_tokens, seed=self.seed)
        if self.engine == "vllm" and path not in self.servers:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self.servers[path] = start_endpoint(engine, path, sampling, self.log_dir, self.stack,
                                                log_name=f"vllm-{len(self.servers)}-{Path(path).name}.log")
        base_url, served = self.servers.get(path, (None, None))
        llm = build_llm(engine, sampling, path, base_url, served)
        llm.load()
        return llm

    def _who(self, path: str, what: str, settings: dict[str, Any]) -> str:
        """The ledger's name for the model at ``path`` asked with these settings (retrained weights: another)."""
        from tpo_data.models import model_fingerprint

        return f"{what} {model_fingerprint(path, {**settings, 'seed': self.seed})}"


@dataclass
class ImproveResult:
    """One item's improvement history: every rewrite, its gap over the answer it rewrote, kept or not."""

    instruction: str
    initial: str
    rewrites: list[str] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    kept: list[bool] = field(default_factory=list)

    @property
    def best(self) -> str:
        kept = [r for r, k in zip(self.rewrites, self.kept) if k]
        return kept[-1] if kept else self.initial

    @property
    def calls(self) -> int:
        return len(self.rewrites)


def improve_many(instructions: Sequence[str], answers: Sequence[str], pit: Any, gap_model: Any,
                 max_rounds: int = 3, threshold: float = 0.0) -> list[ImproveResult]:
    """Improve every (x, y_0) with the stop rule; items still improving are batched per round."""
    results = [ImproveResult(x, y) for x, y in zip(instructions, answers, strict=True)]
    current = list(answers)
    active = list(range(len(results)))
    for round_number in range(1, max_rounds + 1):
        if not active:
            break
        new = pit_round(pit, [results[i].instruction for i in active], [current[i] for i in active])
        gaps = gap_model.calibrated_gap([results[i].instruction for i in active], new,
                                        [current[i] for i in active])
        still = []
        for i, text, gap in zip(active, new, gaps):
            better = bool(text.strip()) and not math.isnan(gap) and gap > threshold  # "" = failed call
            results[i].rewrites.append(text)
            results[i].gaps.append(gap)
            results[i].kept.append(better)
            if better:
                current[i] = text
            if not should_stop(gap, round_number, max_rounds, threshold):
                still.append(i)
        active = still
    return results


class PairwiseLLMJudge:
    """A pair-wise LLM judge (``tpo_data.judges``: the TPO judge prompt, forced verdicts).

    :meth:`compare` judges every (new, old) pair in both orders and returns one outcome
    per pair in {0, 1/4, 1/2, 3/4, 1}: each order gives the new answer 1 for a win, 0 for a
    loss, 1/2 for a tie or no usable verdict, so a judge that always names A scores 1/2.
    ``llm``: a loaded distilabel LLM whose generation kwargs drive the judgments (greedy).
    """

    def __init__(self, llm: Any, name: str = "", force_verdict: bool = True, ledger: CallLedger | None = None,
                 who: str = ""):
        from tpo_data.judges import SYSTEM_PROMPT, USER_TEMPLATE

        self.llm, self.name, self.force_verdict = llm, name, force_verdict
        # Saved verdicts hold for this judge, this prompt and this verdict rule only.
        prompt = hashlib.sha256((SYSTEM_PROMPT + USER_TEMPLATE).encode()).hexdigest()[:10]
        self.ledger, self.who = ledger or CallLedger(None), f"{who or name} prompt={prompt} force={force_verdict}"
        self.calls = self.forced = self.undecided = 0
        self.pairs = self.decided = 0  # pairs judged; those not tied (the two orders did not cancel out)

    def compare(self, instructions: Sequence[str], new: Sequence[str], old: Sequence[str]) -> list[float]:
        from tpo_data.judges import judge_calls

        results = [0.5] * len(new)
        todo = [i for i, (a, b) in enumerate(zip(new, old, strict=True)) if a != b]
        calls = [(instructions[i], new[i], old[i]) for i in todo] + [(instructions[i], old[i], new[i]) for i in todo]
        verdicts = self.ledger.run(self.who, calls, lambda todo_calls: [
            {"r": v.r, "forced": v.forced} for v in judge_calls(_loaded(self.llm), todo_calls, self.force_verdict)])
        self.calls += len(verdicts)
        self.forced += sum(v["forced"] for v in verdicts)
        self.undecided += sum(v["r"] == 0 for v in verdicts)
        for k, i in enumerate(todo):
            # r: +1 when A won. The new answer is A in the first order and B in the second.
            results[i] = (2 + verdicts[k]["r"] - verdicts[k + len(todo)]["r"]) / 4
        self.pairs += len(todo)
        self.decided += sum(results[i] != 0.5 for i in todo)
        return results


def _win_share(judge: Any, instructions: Sequence[str], new: Sequence[str], old: Sequence[str]) -> float:
    if hasattr(judge, "compare"):
        outcomes = judge.compare(list(instructions), list(new), list(old))
        return sum(outcomes) / len(outcomes)
    # An unchanged answer ties: the scorer gives identical pairs one score.
    scores = judge.score(list(instructions) * 2, list(new) + list(old))
    a, b = scores[: len(new)], scores[len(new):]
    # A NaN score (either side) says nothing about the pair: a tie, as for an unusable verdict.
    wins = sum(0.5 if math.isnan(x) or math.isnan(y) or x == y else float(x > y) for x, y in zip(a, b))
    return wins / len(new)


def _mean_chars(texts: Sequence[str]) -> float:
    return sum(len(t) for t in texts) / max(1, len(texts))


def _rounds(model: Any, step: Any, instructions: Sequence[str], initial: Sequence[str],
            rounds: int) -> list[list[str]]:
    """Answers after 1..rounds rounds of ``step``, each on the previous answers (no stop rule)."""
    history = [list(initial)]
    for _ in range(rounds):
        history.append(step(model, instructions, history[-1]))
    return history


def evaluate(instructions: Sequence[str], initial: Sequence[str], pit: Any, gap_model: Any, judge: Any,
             self_refine: Any | None = None, rounds: int = 2, threshold: float = 0.0) -> dict[str, Any]:
    """PIT per round, PIT with the stop rule, and Self-Refine per round, judged by ``judge``.

    ``pit``/``self_refine`` map message lists to answers (:class:`ChatModel`); ``gap_model``
    has ``calibrated_gap(x, new, last)``; ``judge`` has ``score(x, y)`` (point-wise) or
    ``compare(x, new, old)`` (pair-wise, outcomes in [0, 1]) and must not be the gap model.
    """
    if not instructions:
        raise TPODataError("No held-out items to evaluate.", "Use a version whose 'test' config has rows.")
    if judge is gap_model:
        raise TPODataError("The judge is the gap reward model PIT was trained against.",
                           "Judge with an independent point-wise reward model (--judge_model).")
    report: dict[str, Any] = {"items": len(instructions), "rounds": rounds}
    # name: (model, one round, calls per round)
    methods = {"pit": (pit, pit_round, 1)}
    if self_refine is not None:
        methods["self_refine"] = (self_refine, self_refine_round, 2)
    histories = {}
    for name, (model, step, per_round) in methods.items():
        history = _rounds(model, step, instructions, initial, rounds)
        histories[name] = history
        report[name] = []
        for k in range(1, rounds + 1):
            previous = _win_share(judge, instructions, history[k], history[k - 1])
            report[name].append({
                "round": k,
                "calls_per_item": 1 + k * per_round,  # y_0, then each round's calls
                "beat_previous": previous,
                # In round 1 the previous answer is y_0: the same comparison, not judged twice.
                "beat_initial": previous if k == 1 else _win_share(judge, instructions, history[k], history[0]),
                "mean_chars": _mean_chars(history[k]),
                "unchanged": sum(a == b for a, b in zip(history[k], history[k - 1])) / len(history[k]),
            })
    report["initial_mean_chars"] = _mean_chars(initial)
    if self_refine is not None:
        report["pit_vs_self_refine"] = [
            {"round": k, "pit_wins": _win_share(judge, instructions, histories["pit"][k], histories["self_refine"][k])}
            for k in range(1, rounds + 1)]
    stopped = improve_many(instructions, initial, pit, gap_model, max_rounds=rounds, threshold=threshold)
    report["pit_stop_rule"] = {
        "beat_initial": _win_share(judge, instructions, [r.best for r in stopped], initial),
        "calls_per_item": 1 + sum(r.calls for r in stopped) / len(stopped),
        "changed": sum(r.best != r.initial for r in stopped) / len(stopped),
    }
    return report


def format_report(report: dict[str, Any]) -> str:
    """The evaluation as a few plain lines."""
    lines = [f"{report['items']} held-out items, {report['rounds']} rounds (wins; ties count 1/2)"
             + (f"; y0 {report['initial_mean_chars']:.0f} chars" if "initial_mean_chars" in report else "")]
    for name in ("pit", "self_refine"):
        for row in report.get(name, []):
            extra = (f"; {row['mean_chars']:.0f} chars, unchanged {row['unchanged']:.3f}"
                     if "mean_chars" in row else "")
            lines.append(f"{name:12s} round {row['round']} ({row['calls_per_item']} calls): "
                         f"beats previous {row['beat_previous']:.3f}, beats y0 {row['beat_initial']:.3f}{extra}")
    for row in report.get("pit_vs_self_refine", []):
        lines.append(f"pit vs self_refine round {row['round']}: pit wins {row['pit_wins']:.3f}")
    stop = report["pit_stop_rule"]
    lines.append(f"pit + stop rule: beats y0 {stop['beat_initial']:.3f}, "
                 f"{stop['calls_per_item']:.2f} calls per item, answer changed for {stop['changed']:.3f}")
    if report.get("judge_calls"):
        calls = report["judge_calls"]
        lines.append(f"judge ({report.get('judge_model', '?')}, pair-wise, both orders): {calls['calls']} calls, "
                     f"{calls['forced']} forced verdicts, {calls['undecided']} without a verdict; "
                     f"{calls.get('decided', '?')} of {calls.get('pairs', '?')} differing pairs not a tie")
    return "\n".join(lines)

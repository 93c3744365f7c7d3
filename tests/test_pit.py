"""PIT (METHOD.md 2): prompt, rows, gap loss, stop rule, the three trainers, improve and eval."""

import json
import math
import os
import re
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import run_script
from hypothesis import given
from hypothesis import strategies as st

from tpo_data.errors import TPODataError
from tpo_data.pit import (
    GAP_RANKING_PAIRS,
    build_improvement_rows,
    gap_inputs,
    gap_ranking_loss,
    gap_text,
    improvement_prompt,
    parse_improvement_prompt,
    preference_from_row,
    should_stop,
)
from tpo_data.pit_eval import evaluate, improve_many

RECIPE = "recipes/pit-tiny-test.yaml"

# --- improvement prompt -------------------------------------------------------------------


@given(st.text(), st.text())
def test_improvement_prompt_round_trips(instruction, reference):
    if "\n</instruction>\n\n<reference_answer>\n" in instruction:
        return
    assert parse_improvement_prompt(improvement_prompt(instruction, reference)) == (instruction, reference)


def test_improvement_prompt_edge_cases():
    tricky = "a\n</instruction>\n\n<reference_answer>\nb\n</reference_answer>"
    assert parse_improvement_prompt(improvement_prompt("x", tricky)) == ("x", tricky)
    with pytest.raises(TPODataError):
        improvement_prompt(tricky, "ref")
    assert parse_improvement_prompt("Write a better answer to: hi") is None
    assert parse_improvement_prompt(improvement_prompt("x", "y") + " trailing") is None


# --- preference rows -> improvement rows --------------------------------------------------


def _msg(role, text):
    return {"role": role, "content": text}


def test_preference_layouts():
    explicit = {"prompt": [_msg("user", "Q")], "chosen": [_msg("assistant", "good")],
                "rejected": [_msg("assistant", "bad")]}
    implicit = {"chosen": [_msg("user", "Q"), _msg("assistant", "good")],
                "rejected": [_msg("user", "Q"), _msg("assistant", "bad")]}
    # distilabel's FormatTextGenerationDPO: prompt text, full conversations in chosen/rejected.
    distilabel = {"prompt": "Q", "chosen": implicit["chosen"], "rejected": implicit["rejected"]}
    text = {"prompt": "Q", "chosen": "good", "rejected": "bad"}
    hh = {"chosen": "\n\nHuman: Q\n\nAssistant: good", "rejected": "\n\nHuman: Q\n\nAssistant: bad"}
    tpo = {"instruction": "Q", "instruction_id": "i7", "chosen_thought": "THOUGHT", "chosen_response": "good",
           "rejected_thought": "T2", "rejected_response": "bad",
           "chosen": [_msg("assistant", "THOUGHT Here is my response: good")],
           "rejected": [_msg("assistant", "T2 Here is my response: bad")],
           "prompt": [_msg("user", "thought prompt ... Q")]}
    for row in (explicit, implicit, distilabel, text, hh, tpo):
        pref = preference_from_row(row)
        assert (pref.instruction, pref.chosen, pref.rejected) == ("Q", "good", "bad"), row
    assert preference_from_row(tpo).id == "i7"
    assert build_improvement_rows([{**tpo, "rejected_response": None}])[1]["empty"] == 1
    dialogue = {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: Q\n\nAssistant: good",
                "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: Q\n\nAssistant: bad"}
    assert preference_from_row(dialogue).instruction == "User: hi\n\nAssistant: hello\n\nUser: Q"


def test_build_improvement_rows_and_drops():
    good = {"prompt": "Q", "chosen": "good", "rejected": "bad"}
    rows, drops = build_improvement_rows([
        good, dict(good), {"prompt": "Q", "chosen": "same", "rejected": "same"},
        {"prompt": "Q", "chosen": " ", "rejected": "bad"}, {"text": "no preference here"},
    ])
    assert drops == {"unreadable": 1, "empty": 1, "identical": 1, "boundary": 0, "duplicate": 1}
    (row,) = rows
    assert (row["instruction"], row["reference"], row["better"]) == ("Q", "bad", "good")
    assert parse_improvement_prompt(row["prompt"][0]["content"]) == ("Q", "bad")
    assert row["prompt"][0]["role"] == "user"
    assert row["completion"] == [_msg("assistant", "good")]


# --- gap reward loss ----------------------------------------------------------------------


def _loss(wl, ww, ll, lw):
    scores = [torch.tensor([float(v)], requires_grad=True) for v in (wl, ww, ll, lw)]
    loss = gap_ranking_loss(*scores)
    loss.backward()
    return loss.item(), [s.grad.item() for s in scores]


def test_gap_ranking_loss_values():
    assert GAP_RANKING_PAIRS == ((0, 1), (0, 2), (0, 3), (1, 3), (2, 3))
    ordered, _ = _loss(4, 0, 0, -4)
    reversed_, _ = _loss(-4, 0, 0, 4)
    flat, _ = _loss(0, 0, 0, 0)
    assert flat == pytest.approx(5 * math.log(2))
    assert ordered < 0.2 < flat < reversed_
    # The five terms exactly: softplus(-(high - low)).
    s = [1.0, 0.5, -0.2, -1.0]
    expected = sum(math.log1p(math.exp(-(s[h] - s[l]))) for h, l in GAP_RANKING_PAIRS)
    assert _loss(*s)[0] == pytest.approx(expected)
    # A batch is averaged over examples.
    batch = gap_ranking_loss(*(torch.tensor([a, b]) for a, b in ((4.0, -4.0), (0.0, 0.0), (0.0, 0.0), (-4.0, 4.0))))
    assert batch.item() == pytest.approx((ordered + reversed_) / 2)


def test_gap_ranking_loss_middle_class():
    # An equal pair ranked above (w,l) or below (l,w) costs more than one in the middle.
    middle, _ = _loss(2, 0, 0, -2)
    assert _loss(2, 3, 0, -2)[0] > middle
    assert _loss(2, 0, -3, -2)[0] > middle
    # Gradient descent raises R(w,l), lowers R(l,w), and pulls the equal pairs to the middle.
    _, grads = _loss(2, 0, 0, -2)
    assert grads[0] < 0 and grads[3] > 0
    assert grads[1] == pytest.approx(0, abs=1e-7) and grads[2] == pytest.approx(0, abs=1e-7)
    _, grads = _loss(2, 1.8, -1.8, -2)  # (w,w) too close to the top, (l,l) to the bottom
    assert grads[1] > 0 and grads[2] < 0


def test_gap_inputs_order():
    texts = gap_inputs("x", "W", "L")
    assert texts == [gap_text("x", "W", "L"), gap_text("x", "W", "W"), gap_text("x", "L", "L"),
                     gap_text("x", "L", "W")]


# --- stop rule ----------------------------------------------------------------------------


def test_should_stop():
    assert not should_stop(0.3, round=1, max_rounds=3)
    assert should_stop(0.3, round=3, max_rounds=3)
    assert should_stop(0.0, round=1, max_rounds=3)  # not better than the last answer
    assert should_stop(-1.0, round=1, max_rounds=3)
    assert should_stop(0.3, round=1, max_rounds=3, threshold=0.5)
    assert should_stop(float("nan"), round=1, max_rounds=3)
    with pytest.raises(TPODataError):
        should_stop(1.0, round=0, max_rounds=3)


class _ScriptedGap:
    """Returns the next scripted gap for every row."""

    def __init__(self, gaps):
        self.gaps = list(gaps)

    def calibrated_gap(self, instructions, new, last):
        return [self.gaps.pop(0) for _ in instructions]


def _appender(conversations):
    return [m[-1]["content"].rsplit("<reference_answer>\n", 1)[1].split("\n</reference_answer>")[0] + "+"
            for m in conversations]


def test_improve_many_keeps_the_last_better_answer():
    (result,) = improve_many(["x"], ["a"], _appender, _ScriptedGap([0.5, 0.2, -0.1, 9.0]), max_rounds=5)
    assert result.rewrites == ["a+", "a++", "a+++"]
    assert result.kept == [True, True, False]
    assert result.best == "a++" and result.calls == 3
    (capped,) = improve_many(["x"], ["a"], _appender, _ScriptedGap([1.0, 1.0, 1.0]), max_rounds=2)
    assert capped.best == "a++" and capped.calls == 2
    # A failed call (empty text) is never an improvement, whatever the gap model says of it.
    (failed,) = improve_many(["x"], ["a"], lambda convs: ["" for _ in convs], _ScriptedGap([5.0]), max_rounds=1)
    assert failed.kept == [False] and failed.best == "a"


def test_nan_scores_count_as_ties():
    from tpo_data.pit_eval import _win_share

    class NaNJudge:  # a point-wise judge that cannot score answers containing "?"
        def score(self, instructions, responses):
            return [math.nan if "?" in r else float(len(r)) for r in responses]

    # long beats short (1), "?" on either side (1/2 each), equal lengths (1/2)
    assert _win_share(NaNJudge(), ["x"] * 4, ["long", "?", "ab", "ab"], ["s", "ab", "?", "cd"]) == 2.5 / 4


def test_unchanged_answers_tie_under_a_reward_model(tmp_path):
    # Scored in length-sorted batches, the two copies of an answer get padded to other widths
    # and their scores differ in the last bits: without care an unchanged rewrite wins or loses.
    from tiny_models import make_tiny_seqcls

    from tpo_data.pit_eval import _win_share
    from tpo_data.reward_models import RewardModelScorer

    scorer = RewardModelScorer(str(make_tiny_seqcls(tmp_path / "rm")), batch_size=3)
    answers = [" ".join(["word"] * n) for n in (2, 30, 5, 60, 11, 3, 45)]
    assert _win_share(scorer, ["Explain."] * 7, answers, answers) == 0.5
    changed = [*answers[:6], answers[6] + " more"]
    share = _win_share(scorer, ["Explain."] * 7, changed, answers)
    assert share in (3 / 7, 4 / 7)  # six ties, and the changed answer won or lost


class _LengthJudge:
    calls = 0

    def score(self, instructions, responses):
        self.calls += 1
        return [float(len(r)) for r in responses]


def test_evaluate_with_fake_models():
    prompts = []

    def shrink(convs):  # a Self-Refine that makes answers worse
        prompts.extend(c[-1]["content"] for c in convs)
        return ["s" for _ in convs]

    judge = _LengthJudge()
    report = evaluate(["x", "y"], ["a", "bb"], _appender, _ScriptedGap([1.0] * 4), judge,
                      self_refine=shrink, rounds=2)
    # Per method: round 1 vs y0 once (previous == initial), round 2 vs previous and vs y0; then
    # PIT vs Self-Refine per round, and the stop rule's pick vs y0.
    assert judge.calls == 2 * 3 + 2 + 1
    assert [r["beat_initial"] for r in report["pit"]] == [1.0, 1.0]
    assert [r["beat_previous"] for r in report["pit"]] == [1.0, 1.0]
    assert [r["calls_per_item"] for r in report["pit"]] == [2, 3]
    assert report["self_refine"][0]["beat_initial"] == 0.25  # "s" ties "a", loses to "bb"
    # Self-Refine asks for feedback, then rewrites with it: 3 calls for one round, PIT's 2.
    assert [r["calls_per_item"] for r in report["self_refine"]] == [3, 5]
    assert len(prompts) == 2 * 2 * 2 and "Give specific, actionable feedback" in prompts[0]
    assert prompts[2].endswith("Answer:\na\n\nFeedback:\ns")
    assert [r["pit_wins"] for r in report["pit_vs_self_refine"]] == [1.0, 1.0]
    assert report["pit_stop_rule"] == {"beat_initial": 1.0, "calls_per_item": 3.0, "changed": 1.0}
    assert report["initial_mean_chars"] == 1.5 and report["pit"][0]["mean_chars"] == 2.5
    assert report["pit"][0]["unchanged"] == 0.0 and report["self_refine"][1]["unchanged"] == 1.0
    gap = _ScriptedGap([])
    with pytest.raises(TPODataError, match="judge is the gap reward model"):
        evaluate(["x"], ["a"], _appender, gap, gap)


# --- data stage and trainers on tiny models ----------------------------------------------


def _write_prefs(path, n=6):
    rows = [{"prompt": [_msg("user", f"Explain the sky {i}")], "chosen": [_msg("assistant", f"Scattering {i}.")],
             "rejected": [_msg("assistant", f"No idea {i}.")]} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.fixture(scope="module")
def pit_run(tmp_path_factory, tiny_lm):
    """A store with pit-sft-1 (rows stage only) and a gap reward model trained for one step."""
    from tpo_data.pit_data import main as pipeline_main
    from tpo_data.pit_training import main as train_main

    root = tmp_path_factory.mktemp("pit")
    prefs = _write_prefs(root / "prefs.jsonl")
    store = root / "store"
    pipeline_main(["--config", RECIPE, "--preferences", str(prefs), "--store", str(store), "--stage", "rows"])
    train_main(["reward", "--config", RECIPE, "--store", str(store), "--model", str(tiny_lm),
                "--output_dir", str(root / "reward")])
    return {"root": root, "store": store, "reward": root / "reward", "lm": tiny_lm, "prefs": prefs}


def test_rows_stage_writes_train_and_test(pit_run):
    from tpo_data.store import LocalStore

    store = LocalStore(pit_run["store"])
    train, test = store.load("pit-sft-1", "train"), store.load("pit-sft-1", "test")
    assert (train.num_rows, test.num_rows) == (4, 2)
    assert not set(train["id"]) & set(test["id"])
    assert store.manifest("pit-sft-1")["drops"]["unreadable"] == 0


def test_read_preferences_from_tpo_store_and_uncached_hub(tmp_path):
    import yaml
    from datasets import Dataset

    from tpo_data.card import card_metadata
    from tpo_data.pit_data import PITPipelineArguments, read_preferences
    from tpo_data.store import LocalStore

    pairs = Dataset.from_list([{"instruction": "Q", "instruction_id": "i1", "chosen_thought": "T",
                                "chosen_response": "good", "rejected_thought": "T2", "rejected_response": "bad",
                                "chosen": [_msg("assistant", "T good")], "rejected": [_msg("assistant", "T2 bad")],
                                "prompt": [_msg("user", "think first: Q")]}])
    card = f"---\n{yaml.safe_dump(card_metadata(['pairs']))}---\n"
    LocalStore(tmp_path / "tpo").write_version("iter-1", {"pairs": pairs}, {"iteration": 1}, card)
    rows, source = read_preferences(PITPipelineArguments(preferences=str(tmp_path / "tpo" / "iter-1")))
    (row,), _ = build_improvement_rows(rows)
    assert source.startswith("tpo-store:") and (row["better"], row["reference"]) == ("good", "bad")
    with pytest.raises(TPODataError, match="not in the local cache"):
        read_preferences(PITPipelineArguments(preferences="nobody/uncached-preferences"))


def test_recipe_sections_and_unknown_keys(tmp_path):
    from trl import SFTConfig

    from tpo_data.pit_training import PITDataArguments, SFTStageArguments, parse_stage

    data, stage, config = parse_stage("sft", (PITDataArguments, SFTStageArguments, SFTConfig),
                                      ["--config", RECIPE, "--output_dir", str(tmp_path), "--max_steps", "3"],
                                      training=True)
    assert (config.max_steps, config.max_length, config.per_device_train_batch_size) == (3, 256, 2)
    bad = tmp_path / "bad.yaml"
    bad.write_text("sft:\n  no_such_key: 1\n")
    types = (PITDataArguments, SFTStageArguments, SFTConfig)
    with pytest.raises(TPODataError, match="no_such_key"):
        parse_stage("sft", types, ["--config", str(bad)], training=True)
    # The command-line mistakes get the same messages as the TPO commands', never a traceback.
    *_, config = parse_stage("sft", types, [f"--config={RECIPE}", "--output_dir", str(tmp_path)], training=True)
    assert config.max_length == 256
    for argv, message in [(["--config", RECIPE, "--config", RECIPE], "more than once"),
                          (["--config"], "without a file"),
                          (["--config", str(tmp_path / "nope.yaml")], r"recipe '.*nope.yaml' \(--config\) is not a file"),
                          (["--output_dir", str(tmp_path), "--max_step", "3"], "Unknown option.*--max_step 3"),
                          (["--output_dir", str(tmp_path), "--load_best_model_at_end", "true", "--eval_strategy",
                            "epoch", "--save_strategy", "steps"], "Invalid option values: .*load_best_model_at_end")]:
        with pytest.raises(TPODataError, match=message):
            parse_stage("sft", types, argv, training=True)


def test_unreadable_recipe_is_named(monkeypatch):
    from pathlib import Path

    from tpo_data.cli import read_recipe

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_text", denied)  # as root, chmod 000 would not stop the read
    with pytest.raises(TPODataError, match=r"Cannot read the recipe .*pit-tiny-test.yaml: Permission denied"):
        read_recipe(RECIPE)


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_sft_step(pit_run, tmp_path):
    from tpo_data.pit_training import main as train_main

    out = train_main(["sft", "--config", RECIPE, "--store", str(pit_run["store"]), "--model", str(pit_run["lm"]),
                      "--output_dir", str(tmp_path / "sft")])
    before, after = _weights(pit_run["lm"]), _weights(out)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_sft_step_resumes_from_a_checkpoint(pit_run, tmp_path):
    """--resume_from_checkpoint continues the saved run: resumed at its last step, nothing is left to
    train, so the saved model is the checkpoint (a fresh start at another learning rate would differ)."""
    from tpo_data.pit_training import main as train_main

    common = ["sft", "--config", RECIPE, "--store", str(pit_run["store"]), "--model", str(pit_run["lm"]),
              "--max_steps", "1", "--save_strategy", "steps", "--save_steps", "1"]
    first = train_main([*common, "--learning_rate", "1e-3", "--output_dir", str(tmp_path / "first")])
    checkpoint = first / "checkpoint-1"
    resumed = train_main([*common, "--learning_rate", "1e-5", "--output_dir", str(tmp_path / "resumed"),
                          "--resume_from_checkpoint", str(checkpoint)])
    saved, expected, base = _weights(resumed), _weights(checkpoint), _weights(pit_run["lm"])
    assert all(torch.equal(saved[k], expected[k]) for k in expected)
    assert any(not torch.equal(saved[k], base[k]) for k in base)


def test_reward_step_is_seeded(pit_run, tmp_path):
    """The gap reward model's new score head is drawn after --seed is applied: the same run twice
    gives the same weights."""
    from tpo_data.pit_training import main as train_main

    args = ["reward", "--config", RECIPE, "--store", str(pit_run["store"]), "--model", str(pit_run["lm"])]
    torch.manual_seed(1)  # whatever the RNG held before must not matter
    again = _weights(train_main([*args, "--output_dir", str(tmp_path / "again")]))
    first = _weights(pit_run["reward"])
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)


def test_reward_step_push_to_hub_includes_the_gap_marker(pit_run, tmp_path):
    """--push_to_hub uploads the folder once complete: the gap marker that makes it a gap reward
    model is there (transformers' own push ran before it was written)."""
    import subprocess

    from hub_standin import HubStandin
    from test_hub import TOKEN, client_env

    from tpo_data.pit_training import GAP_MARKER

    repo, out = "stand-in-user/pit-gap-reward", tmp_path / "reward"
    with HubStandin(tmp_path / "hub") as hub:
        done = subprocess.run(
            [sys.executable, "trainers/pit.py", "reward", "--config", RECIPE, "--store", str(pit_run["store"]),
             "--model", str(pit_run["lm"]), "--output_dir", str(out), "--push_to_hub", "true",
             "--hub_model_id", repo, "--hub_token", TOKEN],
            env=client_env(tmp_path, hub.url, TOKEN), capture_output=True, text=True, timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        names = hub.repo(repo, "model").commits[hub.repo(repo, "model").resolve("main")].files
        published = {name: hub.read_file(repo, "main", name, "model") for name in names}
    assert json.loads(published[GAP_MARKER])["kind"] == "pit-gap-reward"
    assert published["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert TOKEN not in done.stdout + done.stderr
    # Not in the pickled training arguments either (training_args.bin).
    assert not any(TOKEN.encode() in data for data in published.values())


def test_rl_step_refuses_zero3(pit_run, tmp_path, monkeypatch):
    import transformers.integrations

    from tpo_data.pit_training import main as train_main

    monkeypatch.setattr(transformers.integrations, "is_deepspeed_zero3_enabled", lambda: True)
    with pytest.raises(TPODataError, match="ZeRO-3 would partition"):
        train_main(["rl", "--config", RECIPE, "--store", str(pit_run["store"]), "--reward_model",
                    str(pit_run["reward"]), "--model", str(pit_run["lm"]), "--output_dir", str(tmp_path / "rl")])
    assert not (tmp_path / "rl").exists()


def test_reward_step_trains_the_gap_loss(pit_run):
    from tpo_data.pit_training import GAP_MARKER, GapRewardModel, gap_batch_loss, gap_collator
    from tpo_data.store import LocalStore

    assert json.loads((pit_run["reward"] / GAP_MARKER).read_text())["kind"] == "pit-gap-reward"
    rm = GapRewardModel(pit_run["reward"])
    rows = LocalStore(pit_run["store"]).load("pit-sft-1", "train").to_list()[:2]
    # The trainer's 4-per-example layout matches R(w,l), R(w,w), R(l,l), R(l,w) at inference.
    batch = gap_collator(rm.tokenizer, 256)(rows)
    trainer_loss, _ = gap_batch_loss(rm.model, batch)
    scores = [rm.gap([r["instruction"] for r in rows], [r[a] for r in rows], [r[b] for r in rows])
              for a, b in (("better", "reference"), ("better", "better"), ("reference", "reference"),
                           ("reference", "better"))]
    expected = gap_ranking_loss(*(torch.tensor(s) for s in scores))
    assert trainer_loss.item() == pytest.approx(expected.item(), rel=1e-4)
    # An unchanged answer is exactly "no better", whatever level R(x, y, y) has.
    assert rm.calibrated_gap(["x", "x"], ["same", "new"], ["same", "old"])[0] == 0.0  # exactly, no call


def test_reward_step_under_two_processes(pit_run, tmp_path):
    """The gap reward trainer (our loss inside TRL's Trainer) under a distributed launcher: each of two
    ranks takes 2 rows per step, so two steps cover twice what one process alone would."""
    from tpo_data.pit_training import GAP_MARKER, GapRewardModel
    from tpo_data.store import LocalStore

    out = tmp_path / "reward"
    done = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "trainers/pit.py",
                      "reward", "--config", RECIPE, "--store", str(pit_run["store"]), "--model", str(pit_run["lm"]),
                      "--output_dir", str(out), "--max_steps", "2", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    epochs = [float(e) for e in re.findall(r"'epoch': '([0-9.]+)'", done.stdout)]
    rows = LocalStore(pit_run["store"]).load("pit-sft-1", "train").num_rows
    assert epochs[-1] == pytest.approx(2 * 2 * 2 / rows)  # steps x ranks x batch; one process: half
    assert json.loads((out / GAP_MARKER).read_text())["kind"] == "pit-gap-reward"
    rm = GapRewardModel(out)
    gaps = rm.calibrated_gap(["x", "x"], ["same", "new"], ["same", "old"])
    assert gaps[0] == 0.0 and math.isfinite(gaps[1]) and gaps[1] != 0.0


def _assert_trained(start, out):
    """The RL stage moved the policy's weights (a reward without variance would leave them)."""
    from safetensors.torch import load_file

    before, after = load_file(Path(start) / "model.safetensors"), load_file(Path(out) / "model.safetensors")
    assert before.keys() == after.keys() and any(not before[k].equal(after[k]) for k in before)


def test_rl_step_both_rounds(pit_run, tmp_path):
    from tpo_data.pit_training import main as train_main

    common = ["--config", RECIPE, "--store", str(pit_run["store"]), "--reward_model", str(pit_run["reward"])]
    round1 = train_main(["rl", *common, "--model", str(pit_run["lm"]), "--output_dir", str(tmp_path / "rl-1")])
    assert json.loads((round1 / "pit_rl.json").read_text())["round"] == 1
    _assert_trained(pit_run["lm"], round1)
    # Round 2's references come from the policy, sampled by the distilabel pipeline. It runs as a
    # script: its forked workers would hang on torch's thread pool, which this process has used.
    done = run_script("pipelines/pit.py", "--config", RECIPE, "--store", str(pit_run["store"]), "--stage", "refs",
                      "--model", str(round1), "--output_dir", str(tmp_path / "pipe"), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "pit-rl-refs-2" in done.stdout
    round2_args = ["rl", *common, "--round", "2", "--model", str(round1), "--kl_reference", str(pit_run["lm"])]
    # Refused before any loading: round 2 from the SFT model (no round 1), over its own start, or on
    # references made for another version's instructions.
    for extra, problem in ((["--model", str(pit_run["lm"]), "--output_dir", str(tmp_path / "x")], "skips round 1"),
                           (["--model", str(pit_run["lm"]), "--kl_reference", str(round1), "--output_dir",
                             str(tmp_path / "x")], "which no RL round 1 wrote"),
                           (["--output_dir", str(round1)], "write over the model it starts from"),
                           (["--version", "pit-other", "--output_dir", str(tmp_path / "x")],
                            "references for the instructions of pit-sft-1, not of pit-other")):
        with pytest.raises(TPODataError, match=problem):
            train_main([*round2_args, *extra])
    round2 = train_main([*round2_args, "--output_dir", str(tmp_path / "rl-2")])
    _assert_trained(round1, round2)

    # References rebuilt for another split, with the same model and --output_dir: distilabel's
    # cache must not hand back the answers for the old train instructions.
    from tpo_data.pit_data import main as pipeline_main
    from tpo_data.store import LocalStore

    other = tmp_path / "other-store"
    pipeline_main(["--config", RECIPE, "--preferences", str(pit_run["prefs"]), "--store", str(other),
                   "--stage", "rows", "--split_seed", "3"])

    def train_instructions(store):
        return set(LocalStore(store).load("pit-sft-1", "train")["instruction"])

    assert train_instructions(other) != train_instructions(pit_run["store"])
    again = run_script("pipelines/pit.py", "--config", RECIPE, "--store", str(other), "--stage", "refs",
                       "--model", str(round1), "--output_dir", str(tmp_path / "pipe"), timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert set(LocalStore(other).load("pit-rl-refs-2", "train")["instruction"]) == train_instructions(other)


def test_improve_cli(pit_run, capsys):
    from tpo_data.cli import main as cli_main

    cli_main(["improve", "--pit-model", str(pit_run["lm"]), "--reward-model", str(pit_run["reward"]),
              "--instruction", "Explain the sky", "--answer", "No idea.", "--max-rounds", "2",
              "--max-new-tokens", "4", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["initial"] == "No idea." and 1 <= len(report["rounds"]) <= 2
    assert all(isinstance(r["gap"], float) for r in report["rounds"])
    for flags, problem in ((["--pit-model", "/nonexistent/pit"], "--pit-model"),
                           (["--pit-model", str(pit_run["lm"]), "--reward-model", str(pit_run["lm"])],
                            "not a PIT gap reward model"),
                           (["--pit-model", str(pit_run["lm"]), "--engine", "vllm",
                             "--vllm-gpu-memory-utilization", "1.5"], "must lie in \\(0, 1\\]")):
        argv = ["improve", "--reward-model", str(pit_run["reward"]), "--instruction", "x", *flags]
        try:
            code = cli_main(argv)
        except SystemExit as exited:
            code = exited.code
        assert code == 2
        assert re.search(problem, capsys.readouterr().err)


def _ledger_keys(path):
    keys = []
    for line in path.read_text().splitlines():
        try:
            keys.append(json.loads(line)["key"])
        except json.JSONDecodeError:
            assert not line.endswith("}"), line  # only a torn line may be unreadable
    return keys


def test_pit_eval_cli_end_to_end_and_resumed(pit_run, tmp_path, capsys, monkeypatch):
    """pit-eval with real tiny models and a pair-wise judge; its call ledger makes a rerun free
    and a killed run resume: saved answers and verdicts are reused, never asked again."""
    from tpo_data.cli import main as cli_main

    out = tmp_path / "eval" / "report.json"
    argv = ["pit-eval", "--store", str(pit_run["store"]), "--pit-model", str(pit_run["lm"]),
            "--reward-model", str(pit_run["reward"]), "--judge", "pairwise", "--judge-model", str(pit_run["lm"]),
            "--judge-max-new-tokens", "4", "--max-new-tokens", "6", "--temperature", "1.0", "--rounds", "2",
            "--output", str(out)]
    assert cli_main(argv) == 0
    report, ledger = json.loads(out.read_text()), out.with_suffix(".calls.jsonl")
    assert report["items"] == 2 and "pit + stop rule" in capsys.readouterr().out
    entries = [json.loads(line) for line in ledger.read_text().splitlines()]
    chats = [e for e in entries if e["who"].startswith("--pit-model")]
    verdicts = [e for e in entries if e["who"].startswith("--judge-model")]
    rewrites = round((report["pit_stop_rule"]["calls_per_item"] - 1) * 2)
    # y_0, two PIT rounds, two Self-Refine rounds of feedback + rewrite (the policy is the PIT
    # model), the stop rule's rewrites.
    assert len(chats) == 2 + 2 * 2 + 2 * 2 * 2 + rewrites
    assert len(verdicts) == report["judge_calls"]["calls"] and {e["value"]["r"] for e in verdicts} <= {-1, 0, 1}
    keys = _ledger_keys(ledger)
    assert len(set(keys)) == len(keys)

    # A finished run again: the same report from the ledger, nothing asked, no model even loaded.
    import tpo_data.engines

    built = []
    build_llm = tpo_data.engines.build_llm
    monkeypatch.setattr(tpo_data.engines, "build_llm", lambda *a, **k: built.append(a) or build_llm(*a, **k))
    assert cli_main(argv) == 0
    assert json.loads(out.read_text()) == report and _ledger_keys(ledger) == keys and built == []

    # Killed mid-run: half the calls saved, then a torn line. The rerun keeps the saved half.
    lines = ledger.read_text().splitlines(keepends=True)
    kept = lines[: len(lines) // 2]
    ledger.write_text("".join(kept) + lines[len(kept)][:40])
    out.unlink()
    assert cli_main(argv) == 0
    assert len(built) == 2  # the PIT model (policy, Self-Refine) and the judge: loaded for what was missing
    resumed = _ledger_keys(ledger)
    assert resumed[: len(kept)] == keys[: len(kept)] and len(set(resumed)) == len(resumed)
    assert json.loads(out.read_text())["items"] == 2


# --- pit-eval's pair-wise judge and pit-run --------------------------------------------------


class _FakeJudgeLLM:
    """A pair-wise judge LLM that prefers the answer containing GOOD, or always names A."""

    def __init__(self, biased=False):
        self.biased, self.calls = biased, 0

    def get_generation_kwargs(self):
        return {}

    def generate_outputs(self, inputs, num_generations=1, **kwargs):
        self.calls += len(inputs)
        texts = []
        for messages in inputs:
            user = messages[-1]["content"]
            first_good = "GOOD" in user and ("bad" not in user or user.index("GOOD") < user.index("bad"))
            texts.append("[[A]]" if self.biased or first_good else "[[B]]")
        return [{"generations": [t]} for t in texts]


def test_pairwise_judge_outcomes_and_win_share():
    from tpo_data.pit_eval import PairwiseLLMJudge, _win_share

    judge = PairwiseLLMJudge(_FakeJudgeLLM())
    # Both orders agree: GOOD wins; an unchanged answer is a tie without a judge call.
    assert judge.compare(["x", "y", "z"], ["GOOD", "bad", "same"], ["bad", "GOOD", "same"]) == [1.0, 0.0, 0.5]
    assert judge.llm.calls == 4 and judge.calls == 4 and (judge.pairs, judge.decided) == (2, 2)
    assert _win_share(judge, ["x", "y"], ["GOOD", "GOOD"], ["bad", "bad"]) == 1.0
    judge.llm = _FakeJudgeLLM(biased=True)  # always "A": the two orders cancel out
    assert judge.compare(["x"], ["GOOD"], ["bad"]) == [0.5]


def _marker_stage(name, tmp_path, needs=(), stamp=False, store_version=False, fail=False, settings=None):
    from tpo_data.pit_run import Stage

    marker = tmp_path / name / ("stamp.json" if stamp else "manifest.json")
    write_marker = f"p = pathlib.Path({str(marker)!r}); p.parent.mkdir(exist_ok=True); p.write_text('{{}}')"
    code = (f"import pathlib; pathlib.Path({str(tmp_path / 'log')!r}).open('a').write({name!r} + '\\n')\n"
            + ("raise SystemExit(3)\n" if fail else "") + ("" if stamp else write_marker))
    return Stage(name, [sys.executable, "-c", code], marker, list(needs), stamp=stamp, store_version=store_version,
                 settings=settings or {})


def _ran(tmp_path):
    log = tmp_path / "log"
    return log.read_text().split() if log.is_file() else []


def test_pit_run_skips_finished_stages_and_redoes_stale_ones(tmp_path):
    from tpo_data.pit_run import run_stages

    def stages():
        return [_marker_stage("rows", tmp_path, store_version=True),
                _marker_stage("sft", tmp_path, ["rows"], stamp=True),
                _marker_stage("rl", tmp_path, ["rows", "sft"], stamp=True),
                _marker_stage("eval", tmp_path, ["rl"])]

    times = tmp_path / "run" / "pit_run.json"
    assert run_stages(stages(), times) == 0
    assert _ran(tmp_path) == ["rows", "sft", "rl", "eval"]
    assert set(json.loads(times.read_text())) == {"rows", "sft", "rl", "eval"}
    assert json.loads((tmp_path / "sft" / "stamp.json").read_text())["stage"] == "sft"
    run_stages(stages(), times)  # everything done: nothing runs
    assert _ran(tmp_path) == ["rows", "sft", "rl", "eval"]
    # A model folder without its stamp (a killed run) is trained again, and what reads it is redone.
    (tmp_path / "sft" / "stamp.json").unlink()
    run_stages(stages(), times)
    assert _ran(tmp_path)[4:] == ["sft", "rl", "eval"]
    # A store version older than its input is never rewritten: the run names the folder to delete.
    os.utime(tmp_path / "sft" / "stamp.json", (time.time() + 60, time.time() + 60))
    late = [_marker_stage("sft", tmp_path, stamp=True), _marker_stage("rows", tmp_path, ["sft"], store_version=True)]
    with pytest.raises(TPODataError, match="Delete .*rows"):
        run_stages(late, times)
    # So is one older than source data from outside the chain (a preference file rewritten in place).
    source = tmp_path / "prefs.jsonl"
    source.write_text("{}")
    reading = _marker_stage("rows", tmp_path, store_version=True)
    reading.reads = [source]
    os.utime(source, (time.time() + 120, time.time() + 120))
    with pytest.raises(TPODataError, match=f"(?s)older than {re.escape(str(source))}, which changed.*Delete .*rows"):
        run_stages([reading], times)


def test_pit_run_redoes_a_stage_whose_recipe_settings_changed(tmp_path):
    from tpo_data.pit_run import run_stages

    def stages(sft_lr=1e-5, holdout=16):
        return [_marker_stage("rows", tmp_path, store_version=True, settings={"holdout_size": holdout}),
                _marker_stage("sft", tmp_path, ["rows"], stamp=True, settings={"sft": {"learning_rate": sft_lr}}),
                _marker_stage("eval", tmp_path, ["sft"])]

    times = tmp_path / "pit_run.json"
    run_stages(stages(), times)
    run_stages(stages(), times)
    assert _ran(tmp_path) == ["rows", "sft", "eval"]
    # Another learning rate: sft is trained again, and eval (which reads it) redone; rows kept.
    run_stages(stages(sft_lr=5e-5), times)
    assert _ran(tmp_path)[3:] == ["sft", "eval"]
    run_stages(stages(sft_lr=5e-5), times)
    assert len(_ran(tmp_path)) == 5
    # A store version made with other settings is never rewritten: the run names it.
    with pytest.raises(TPODataError, match="(?s)made with other recipe settings for rows.*Delete .*rows"):
        run_stages(stages(sft_lr=5e-5, holdout=8), times)


def test_pit_run_fingerprints_follow_what_each_stage_reads(tmp_path):
    import yaml

    from tpo_data.pit_run import plan

    def fingerprints(edit):
        recipe = yaml.safe_load(open("recipes/pit-smollm2.yaml"))
        edit(recipe)
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        return {s.name: s.fingerprint for s in plan(tmp_path / "r.yaml", python="PY")}

    def reorder(recipe):
        for name in ("prefs", "rl2", "eval"):
            recipe[name] = dict(reversed(recipe[name].items()))

    base = fingerprints(lambda r: None)
    changed = {
        "refs model": (lambda r: r["pipeline"].update(model="outputs/pit-smollm2/rl-1"), {"refs-2"}),
        "rl beta": (lambda r: r["rl"].update(beta=0.1), {"rl-1", "rl-2"}),
        "eval rounds": (lambda r: r["eval"].update(rounds=3), {"eval"}),
        "holdout": (lambda r: r["pipeline"].update(holdout_size=8), {"rows", "refs-2"}),
        "torch threads": (lambda r: r.setdefault("run", {}).update(torch_threads=2), set()),
        "key order": (reorder, set()),
    }
    # The same recipe elsewhere is the same recipe.
    moved = tmp_path / "moved" / "pit.yaml"
    moved.parent.mkdir()
    assert fingerprints(lambda r: None) == base  # rewrites r.yaml unedited
    moved.write_text((tmp_path / "r.yaml").read_text())
    assert {s.name: s.fingerprint for s in plan(moved, python="PY")} == base
    for what, (edit, stages) in changed.items():
        now = fingerprints(edit)
        assert {name for name in base if now[name] != base[name]} == stages, what


def test_pit_run_stops_at_a_failing_stage(tmp_path):
    from tpo_data.pit_run import run_stages

    stages = [_marker_stage("sft", tmp_path, stamp=True, fail=True), _marker_stage("rl", tmp_path, ["sft"], stamp=True)]
    with pytest.raises(TPODataError, match="Stage sft failed .exit status 3"):
        run_stages(stages, tmp_path / "times.json")
    assert _ran(tmp_path) == ["sft"] and not stages[0].marker.exists()
    with pytest.raises(TPODataError, match="Unknown stage"):
        run_stages(stages, tmp_path / "times.json", only="nope")


def test_pit_run_plan_of_the_recipe(tmp_path):
    import yaml

    from tpo_data.pit_run import plan

    stages = plan("recipes/pit-smollm2.yaml", python="PY")
    assert [s.name for s in stages] == ["prefs", "rows", "sft", "reward", "rl-1", "refs-2", "rl-2", "eval"]
    by = {s.name: s for s in stages}
    assert by["prefs"].command[:4] == ["PY", "pipelines/tpo.py", "--config", "recipes/tpo-smollm2.yaml"]
    assert str(by["prefs"].marker) == "outputs/pit-smollm2/prefs/store/iter-1/manifest.json"
    assert by["rl-2"].command[-8:] == ["--kl_reference", "outputs/pit-smollm2/sft", "--model", "outputs/pit-smollm2/rl-1",
                                       "--output_dir", "outputs/pit-smollm2/rl-2", "--round", "2"]
    assert by["rl-2"].needs == ["rl-1", "refs-2", "sft", "reward"] and by["sft"].stamp
    assert "--judge" in by["eval"].command and str(by["eval"].marker) == "outputs/pit-smollm2/eval.json"
    # A renamed store version must be the one every reader names, else a stage waits for the wrong marker.
    renamed = yaml.safe_load(open("recipes/pit-smollm2.yaml"))
    renamed["pipeline"]["sft_version"] = "rows-v2"
    (tmp_path / "renamed.yaml").write_text(yaml.safe_dump(renamed))
    with pytest.raises(TPODataError, match=r"writes rows-v2, but the sft stage reads version pit-sft-1") as err:
        plan(tmp_path / "renamed.yaml")
    assert "Set `version: rows-v2` at the top level" in err.value.fix
    renamed["version"] = renamed["eval"]["version"] = "rows-v2"
    (tmp_path / "renamed.yaml").write_text(yaml.safe_dump(renamed))
    (rows,) = [s for s in plan(tmp_path / "renamed.yaml") if s.name == "rows"]
    assert rows.marker.parent.name == "rows-v2"
    recipe = yaml.safe_load(open("recipes/pit-smollm2.yaml"))
    # Without a prefs section, missing preference data is an error naming what to run.
    del recipe["prefs"]
    recipe["pipeline"]["preferences"] = str(tmp_path / "tpo-smollm2" / "store" / "iter-1")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(TPODataError, match="(?s)does not exist.*scripts/main.sh"):
        plan(tmp_path / "r.yaml")
    # Once it exists, the rows stage reads it from outside the chain: its manifest dates it.
    version = tmp_path / "tpo-smollm2" / "store" / "iter-1"
    version.mkdir(parents=True)
    (version / "manifest.json").write_text("{}")
    (rows,) = [s for s in plan(tmp_path / "r.yaml") if s.name == "rows"]
    assert rows.reads == [version / "manifest.json"] and rows.needs == []
    # A Hub dataset id (the paper's data): read from the local Hugging Face cache by the rows stage.
    recipe["pipeline"]["preferences"] = "Anthropic/hh-rlhf"
    (tmp_path / "hub.yaml").write_text(yaml.safe_dump(recipe))
    (rows,) = [s for s in plan(tmp_path / "hub.yaml") if s.name == "rows"]
    assert rows.reads == [] and rows.needs == []
    recipe["pipeline"]["preferences"] = str(version)
    recipe["prefs"] = {"output_dir": str(tmp_path / "elsewhere")}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(TPODataError, match="prefs stage writes"):
        plan(tmp_path / "r.yaml")
    (tmp_path / "broken.yaml").write_text("rl: [1\n")
    with pytest.raises(TPODataError, match="broken.yaml is not valid YAML") as err:
        plan(tmp_path / "broken.yaml")
    assert "Fix the YAML" in err.value.fix
    # A section that is no mapping is named, in pit-run and in the stage scripts alike.
    for section, value in [("pipeline", [1]), ("sft", 5), ("prefs", [1]), ("eval", ["x"]), ("run", "fast")]:
        bad = {**yaml.safe_load(open("recipes/pit-smollm2.yaml")), section: value}
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
        with pytest.raises(TPODataError, match=re.escape(f"section '{section}' holds {value!r}, not a mapping")) as err:
            plan(tmp_path / "bad.yaml")
        assert f"Write it as `{section}:`" in err.value.fix
    typo = {**yaml.safe_load(open("recipes/pit-smollm2.yaml")), "sftt": {"learning_rate": 1.0}}
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(typo))
    with pytest.raises(TPODataError, match="unknown section.s. sftt") as err:
        plan(tmp_path / "typo.yaml")
    assert "Sections are pipeline, sft, reward, rl" in err.value.fix
    renamed = yaml.safe_load(open("recipes/pit-smollm2.yaml"))
    renamed["sftt"] = renamed.pop("sft")  # not "section 'sft' has no 'output_dir'"
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(renamed))
    with pytest.raises(TPODataError, match="unknown section.s. sftt"):
        plan(tmp_path / "typo.yaml")
    # A mapping-valued shared setting is no section, misspelt or not: every stage may read it.
    shared = {**yaml.safe_load(open("recipes/pit-smollm2.yaml")), "model_init_kwargs": {"dtype": "float32"}}
    (tmp_path / "shared.yaml").write_text(yaml.safe_dump(shared))
    assert [s.name for s in plan(tmp_path / "shared.yaml")][:2] == ["prefs", "rows"]
    from tpo_data.pit_training import load_recipe

    (tmp_path / "sft.yaml").write_text("sft: 5\n")
    with pytest.raises(TPODataError, match="section 'sft' holds 5, not a mapping"):
        load_recipe(tmp_path / "sft.yaml", "sft", {"learning_rate"})


def test_pit_run_masks_a_stage_token(tmp_path, capsys):
    """A token in a stage's section becomes a flag of its command: never shown or recorded in clear."""
    import yaml

    from tpo_data.pit_run import _record, plan, run_stages

    token = "hf_" + "q" * 34
    recipe = yaml.safe_load(open("recipes/pit-smollm2.yaml"))
    recipe["rl2"]["hub_token"] = token
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    stages = plan(tmp_path / "r.yaml", python="PY")
    (rl2,) = [s for s in stages if s.name == "rl-2"]
    assert token in rl2.command  # the stage gets it
    run_stages(stages, tmp_path / "times.json", dry_run=True)
    printed = capsys.readouterr().out
    assert "--hub_token ***" in printed and token not in printed
    _record(tmp_path / "times.json", rl2, 1.0)
    assert token not in (tmp_path / "times.json").read_text()
    assert "--hub_token ***" in (tmp_path / "times.json").read_text()


def test_train_layers_freezes_all_but_the_top(tiny_lm):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from tpo_data.pit_training import freeze_lower_layers

    lm = freeze_lower_layers(AutoModelForCausalLM.from_pretrained(tiny_lm), 1)
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("model.layers.1.", "model.norm.")) for n in trainable)
    rm = freeze_lower_layers(AutoModelForSequenceClassification.from_pretrained(tiny_lm, num_labels=1), 2)
    assert {n.split(".")[0] for n, p in rm.named_parameters() if p.requires_grad} == {"model", "score"}
    assert not any(p.requires_grad for p in rm.model.embed_tokens.parameters())
    with pytest.raises(TPODataError, match="exceeds"):
        freeze_lower_layers(AutoModelForCausalLM.from_pretrained(tiny_lm), 3)


def test_split_keeps_every_row_of_a_test_instruction_out_of_training():
    from tpo_data.pit_data import split_rows

    # 10 prompts with 1-6 pairs each, as in preference sets with several pairs per prompt.
    rows = [{"id": f"{p}-{j}", "instruction": f"prompt {p}"} for p in range(10) for j in range(1 + p % 6)]
    for seed in range(5):
        train, test = split_rows(rows, 8, seed)
        assert len(train) + len(test) == len(rows) and len(test) >= 8
        test_prompts = {r["instruction"] for r in test}
        assert not test_prompts & {r["instruction"] for r in train}
        # Minimal: without its last instruction the test set would be under 8 rows.
        assert len(test) - max(sum(r["instruction"] == p for r in test) for p in test_prompts) < 8
    assert split_rows(rows, 8, 0) != split_rows(rows, 8, 1)
    # At least one instruction always stays for training.
    train, test = split_rows(rows, 1000, 0)
    assert len({r["instruction"] for r in train}) == 1 and len(test) == len(rows) - len(train)


def test_pit_stages_train_in_float32_from_a_bf16_checkpoint(tmp_path):
    from types import SimpleNamespace

    from tiny_models import make_tiny_causal_lm
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from tpo_data.pit_training import _load

    path = make_tiny_causal_lm(tmp_path / "lm")
    AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).save_pretrained(path)
    assert AutoModelForCausalLM.from_pretrained(path).dtype == torch.bfloat16  # transformers 5 keeps it
    plain = SimpleNamespace(model_init_kwargs=None)
    assert _load(AutoModelForCausalLM, str(path), plain).dtype == torch.float32
    rm = _load(AutoModelForSequenceClassification, str(path), plain, num_labels=1)
    assert rm.dtype == torch.float32 and rm.score.weight.dtype == torch.float32
    # The recipe's model_init_kwargs still decide when they name a dtype.
    chosen = SimpleNamespace(model_init_kwargs={"dtype": torch.bfloat16})
    assert _load(AutoModelForCausalLM, str(path), chosen).dtype == torch.bfloat16

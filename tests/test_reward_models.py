"""RewardModelScorer, the PointwiseRewardJudge step and the distilabel TF5 adapter on tiny random models."""

from __future__ import annotations

import json
import math

import pytest
import torch
from distilabel.pipeline import Pipeline
from distilabel.steps import LoadDataFromDicts, RewardModelScore
from tiny_models import make_tiny_seqcls, make_tokenizer, tiny_llama_config
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
)

from tpo_data.errors import TPODataError
from tpo_data.reward_models import PLAIN_FORMAT, PointwiseRewardJudge, RewardModelScorer, RewardModelScoreTF5

INSTRUCTIONS = [
    "Write a short poem about the sea.",
    "Hi",
    "Explain why the sky is blue in simple words for a child, with an example.",
    "What is 6 times 7?",
    "Write a short poem about the sea.",
    "def add(a, b)?",
]
RESPONSES = [
    "The sea is wide, the sky is high. " * 8,
    "Hello!",
    "Sunlight has many colours; the blue part bounces around the air the most.",
    "42",
    "Waves.",
    "def add(a, b):\n    return a + b\n",
]


@pytest.fixture(scope="module")
def seqcls_dir(tmp_path_factory):
    return make_tiny_seqcls(tmp_path_factory.mktemp("seqcls"))


def direct_scores(folder, instructions, responses) -> list[float]:
    """One unpadded forward per pair, straight through transformers."""
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    scores = []
    for instruction, response in zip(instructions, responses):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": instruction}, {"role": "assistant", "content": response}],
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]
        with torch.no_grad():
            scores.append(model(input_ids=ids).logits[0, 0].item())
    return scores


def test_scores_are_floats_equal_to_direct_forward(seqcls_dir):
    scorer = RewardModelScorer(str(seqcls_dir), batch_size=4)
    assert scorer.kind == "sequence_classification"
    scores = scorer.score(INSTRUCTIONS, RESPONSES)
    assert all(type(s) is float for s in scores)
    assert scores == pytest.approx(direct_scores(seqcls_dir, INSTRUCTIONS, RESPONSES), rel=1e-5, abs=1e-5)
    assert len(set(round(s, 3) for s in scores)) > 3  # the random head separates inputs


def test_batching_restores_order(seqcls_dir, monkeypatch):
    single = RewardModelScorer(str(seqcls_dir), batch_size=1).score(INSTRUCTIONS, RESPONSES)
    scorer = RewardModelScorer(str(seqcls_dir), batch_size=4)
    widths: list[list[int]] = []
    original = scorer._forward

    def spy(rows, gating):
        widths.append([len(r) for r in rows])
        return original(rows, gating)

    monkeypatch.setattr(scorer, "_forward", spy)
    assert scorer.score(INSTRUCTIONS, RESPONSES) == pytest.approx(single, rel=1e-5, abs=1e-5)
    flat = [w for batch in widths for w in batch]
    assert flat == sorted(flat, reverse=True) and [len(b) for b in widths] == [4, 2]
    assert scorer.score([], []) == []


def test_encoder_reward_model_keeps_the_attention_mask(tmp_path):
    # A bidirectional encoder would see right-padding pads without the mask, so batched
    # scores would drift from single ones; decoders drop the mask (see _forward).
    folder = tmp_path / "bert"
    tokenizer = make_tokenizer(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=1,
    )
    model = BertForSequenceClassification(config)
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, 1.0)  # scores of order 1, so a wrong mask shows
    model.save_pretrained(folder)
    single = RewardModelScorer(str(folder), batch_size=1)
    batched = RewardModelScorer(str(folder), batch_size=6)
    assert not batched._causal
    assert RewardModelScorer(str(make_tiny_seqcls(tmp_path / "llama")))._causal
    assert batched.score(INSTRUCTIONS, RESPONSES) == pytest.approx(
        single.score(INSTRUCTIONS, RESPONSES), rel=1e-5, abs=1e-5
    )


def test_plain_format_without_chat_template(seqcls_dir, tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    for file in seqcls_dir.iterdir():
        if file.name != "chat_template.jinja":
            (folder / file.name).write_bytes(file.read_bytes())
    scorer = RewardModelScorer(str(folder))
    assert not scorer._uses_template
    text = PLAIN_FORMAT.format(instruction="Hi", response="Hello!") + "<|im_end|>"
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    ids = AutoTokenizer.from_pretrained(folder)(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids).logits[0, 0].item()
    assert scorer.score(["Hi"], ["Hello!"])[0] == pytest.approx(expected, abs=1e-5)


def test_non_finite_scores_become_nan(seqcls_dir):
    scorer = RewardModelScorer(str(seqcls_dir))
    with torch.no_grad():
        scorer.model.score.weight.fill_(float("inf"))
    scores = scorer.score(INSTRUCTIONS[:2], RESPONSES[:2])
    assert all(math.isnan(s) for s in scores)


def test_bad_paths_name_problem_and_fix(tmp_path):
    with pytest.raises(TPODataError, match="config.json") as err:
        RewardModelScorer(str(tmp_path / "does-not-exist"))
    assert "How to fix" in str(err.value)

    (tmp_path / "random").mkdir()
    (tmp_path / "random" / "notes.txt").write_text("not a model")
    with pytest.raises(TPODataError, match="config.json"):
        RewardModelScorer(str(tmp_path / "random"))

    causal = tmp_path / "causal"
    tokenizer = make_tokenizer(causal)
    LlamaForCausalLM(tiny_llama_config(tokenizer, 32, 1)).save_pretrained(causal)
    for kind in ("auto", "sequence_classification"):
        with pytest.raises(TPODataError, match="not a reward model.*LlamaForCausalLM") as err:
            RewardModelScorer(str(causal), kind=kind)
        assert "ForSequenceClassification" in err.value.fix


def test_multi_logit_head_and_broken_weights_are_refused(tmp_path):
    two = tmp_path / "two"
    tokenizer = make_tokenizer(two)
    config = tiny_llama_config(tokenizer, 32, 1, num_labels=2)
    LlamaForSequenceClassification(config).save_pretrained(two)
    with pytest.raises(TPODataError, match="2-logit head"):
        RewardModelScorer(str(two))

    # config.json says 2 labels, the saved head has 1: a clear error, not a traceback.
    broken = make_tiny_seqcls(tmp_path / "broken")
    config_dict = json.loads((broken / "config.json").read_text())
    config_dict.update(id2label={"0": "a", "1": "b"}, label2id={"a": 0, "b": 1})
    (broken / "config.json").write_text(json.dumps(config_dict))
    with pytest.raises(TPODataError, match="Could not load"):
        RewardModelScorer(str(broken))


def test_long_pairs_are_scored_on_their_start_and_flagged(seqcls_dir):
    model = AutoModelForSequenceClassification.from_pretrained(seqcls_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(seqcls_dir)
    full = [tokenizer.apply_chat_template(
        [{"role": "user", "content": i}, {"role": "assistant", "content": r}], return_dict=True)["input_ids"]
        for i, r in zip(INSTRUCTIONS, RESPONSES)]
    limit = sorted(len(ids) for ids in full)[len(full) // 2]
    scorer = RewardModelScorer(str(seqcls_dir), batch_size=4, max_length=limit)
    results = scorer.score_detailed(INSTRUCTIONS, RESPONSES)
    assert [r.truncated for r in results] == [len(ids) > limit for ids in full]
    assert 0 < sum(r.truncated for r in results) < len(full)
    with torch.no_grad():
        expected = [model(input_ids=torch.tensor([ids[:limit]])).logits[0, 0].item() for ids in full]
    assert [r.score for r in results] == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_step_skips_rows_without_response(seqcls_dir, monkeypatch):
    step = PointwiseRewardJudge(name="judge", model=str(seqcls_dir))
    step.load()
    seen: list[str] = []
    original = step._scorer.score

    def spy(instructions, responses):
        seen.extend(responses)
        return original(instructions, responses)

    monkeypatch.setattr(step._scorer, "score", spy)
    rows = [
        {"instruction": "Hi", "response": "Hello!"},
        {"instruction": "Hi", "response": None},
        {"instruction": "Hi", "response": "   "},
    ]
    out = next(step.process(rows))
    assert seen == ["Hello!"]
    assert isinstance(out[0]["score"], float) and out[1]["score"] is None and out[2]["score"] is None


def test_group_judge_scores_identical_answers_alike(seqcls_dir):
    # Sampled answers repeat. Scored apart, in batches padded to other widths, two copies differ
    # in the last bits; scored once, equal answers tie and a group of them is dropped as all_equal.
    from tpo_data.judges import JudgeArguments
    from tpo_data.pair_data import build_iteration_data
    from tpo_data.prompts import PRESETS
    from tpo_data.reward_models import GroupRewardJudge

    step = GroupRewardJudge(name="judge", model=str(seqcls_dir), batch_size=2)
    step.load()
    long_one = " ".join(["word"] * 60)
    rows = [{"id": "q0", "category": "c", "instruction": "Explain.", "parsed": [True] * 5,
             "responses": ["short", long_one, "short", "mid " * 9, "short"]},
            {"id": "q1", "category": "c", "instruction": "Explain.", "parsed": [True] * 3,
             "responses": [long_one] * 3}]
    out = next(step.process(rows))
    scores = out[0]["scores"]
    assert scores[0] == scores[2] == scores[4] and out[1]["scores"][0] == scores[1]
    assert [r["judge_calls"] for r in out] == [5, 3]
    for row in out:
        row.update(generation=list(row["responses"]), thoughts=[""] * len(row["responses"]))
    data = build_iteration_data(out, PRESETS["direct"], JudgeArguments(judge="reward_model", rho="0"), 1)
    assert [p["instruction_id"] for p in data.pairs] == ["q0"] and data.stats["drops"]["all_equal"] == 1


def test_step_in_a_distilabel_pipeline(seqcls_dir, tmp_path):
    rows = [{"instruction": i, "response": r} for i, r in zip(INSTRUCTIONS, RESPONSES)]
    rows.append({"instruction": "Parse failure", "response": None})
    # Use torch's thread pool in this (parent) process first: forked CPU workers used to hang after that.
    (torch.randn(256, 256) @ torch.randn(256, 256)).sum()
    with Pipeline(name="rm-judge-test", cache_dir=tmp_path / "cache") as pipeline:
        load = LoadDataFromDicts(data=rows, batch_size=4)
        judge = PointwiseRewardJudge(model=str(seqcls_dir), batch_size=3, input_batch_size=5)
        load >> judge
    distiset = pipeline.run(use_cache=False)
    table = distiset["default"]["train"]
    got = {(r["instruction"], r["response"]): r["score"] for r in table}
    expected = direct_scores(seqcls_dir, INSTRUCTIONS, RESPONSES)
    for instruction, response, score in zip(INSTRUCTIONS, RESPONSES, expected):
        assert got[(instruction, response)] == pytest.approx(score, rel=1e-5, abs=1e-5)
    assert got[("Parse failure", None)] is None


def test_tf5_adapter_returns_floats(seqcls_dir):
    expected = direct_scores(seqcls_dir, INSTRUCTIONS, RESPONSES)
    step = RewardModelScoreTF5(name="tf5", model=str(seqcls_dir))
    step.load()
    for rows in (INSTRUCTIONS, INSTRUCTIONS[:1], INSTRUCTIONS[:2]):  # batch of 2 was upstream's only float case
        n = len(rows)
        out = next(step.process([{"instruction": i, "response": r} for i, r in zip(rows, RESPONSES[:n])]))
        assert all(type(row["score"]) is float for row in out)
        assert [row["score"] for row in out] == pytest.approx(expected[:n], rel=1e-5, abs=1e-5)


def test_upstream_reward_model_score_still_breaks_on_transformers_5(seqcls_dir):
    """Guards the adapter: when this fails, upstream fixed it and RewardModelScoreTF5 can go."""
    step = RewardModelScore(name="upstream", model=str(seqcls_dir))
    step.load()
    with pytest.raises(TypeError, match="BatchEncoding"):
        next(step.process([{"instruction": "Hi", "response": "Hello!"}]))

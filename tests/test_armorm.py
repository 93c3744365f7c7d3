"""ArmoRM without remote code: our module against an independent re-computation.

The expected values are computed here from the saved tensors with a plain transformers
``LlamaModel`` (for the backbone only) plus the published head math written out by hand:
regression on the last token, gating on the end-of-turn token that closes the user turn,
softmax(MLP / temperature) * logit_scale, score = sum(gate * (rewards @ T)).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tiny_models import ARMORM_NUM_OBJECTIVES, make_tiny_armorm, make_tokenizer
from transformers import AutoTokenizer, LlamaConfig, LlamaModel

from tpo_data.armorm import ArmoRMForScoring, find_gating_position, gating_pattern_from_template, load_armorm
from tpo_data.errors import TPODataError
from tpo_data.reward_models import RewardModelScorer

INSTRUCTIONS = [
    "Explain why the sky is blue.",
    "Hi",
    "Write a short poem about the sea and the sky, in four lines, with a rhyme.",
    "What is 6 times 7?",
    "Explain why the sky is blue.",
]
RESPONSES = [
    "Because of Rayleigh scattering: short wavelengths scatter more. " * 6,
    "Hello!",
    "The sea is wide,\nthe sky is high,\nthe waves collide,\nthe gulls reply.",
    "42",
    "It just is.",
]
TEMPERATURE = 7.0  # not the default, so a test fails if the config value is ignored


@pytest.fixture(scope="module")
def armorm_dir(tmp_path_factory):
    return make_tiny_armorm(tmp_path_factory.mktemp("armorm"), gating_temperature=TEMPERATURE)


def expected_outputs(folder, instruction: str, response: str) -> dict[str, torch.Tensor]:
    """Independent forward for one unpadded pair."""
    tensors = load_file(str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    backbone = LlamaModel(LlamaConfig(**config)).eval()
    backbone.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})

    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = f"<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n{response}<|im_end|>\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    # The published pattern is "end of user turn + assistant header"; in ChatML that text is:
    pattern = tokenizer("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    gate_at = max(j for j in range(len(ids) - len(pattern) + 1) if ids[j : j + len(pattern)] == pattern)
    assert ids[gate_at] == tokenizer.convert_tokens_to_ids("<|im_end|>")

    with torch.no_grad():
        hidden = backbone(torch.tensor([ids])).last_hidden_state[0]
        rewards = hidden[-1] @ tensors["regression_layer.weight"].T
        x = hidden[gate_at]
        n_layers = config["gating_n_hidden"] + 1
        for i in range(n_layers):
            x = x @ tensors[f"gating.layers.{i}.weight"].T + tensors[f"gating.layers.{i}.bias"]
            if i < n_layers - 1:
                x = torch.relu(x)
        gate = F.softmax(x / config["gating_temperature"], dim=0) * tensors["gating.logit_scale"][0]
        score = torch.dot(gate, rewards @ tensors["reward_transform_matrix"])
    return {"score": score, "rewards": rewards, "gate": gate}


def test_scores_match_independent_forward(armorm_dir):
    scorer = RewardModelScorer(str(armorm_dir), batch_size=3)
    assert scorer.kind == "armorm"
    results = scorer.score_detailed(INSTRUCTIONS, RESPONSES)
    for instruction, response, result in zip(INSTRUCTIONS, RESPONSES, results):
        expected = expected_outputs(armorm_dir, instruction, response)
        assert isinstance(result.score, float)
        assert result.score == pytest.approx(expected["score"].item(), abs=1e-5)
        assert result.objective_rewards == pytest.approx(expected["rewards"].tolist(), abs=1e-5)
        assert result.gating_weights == pytest.approx(expected["gate"].tolist(), abs=1e-6)
        assert len(result.objective_rewards) == ARMORM_NUM_OBJECTIVES


def test_head_reads_config_and_checkpoint(armorm_dir):
    model = load_armorm(armorm_dir)
    assert isinstance(model, ArmoRMForScoring)
    assert model.gating.temperature == TEMPERATURE
    assert model.gating.logit_scale.item() == pytest.approx(1.7)
    assert not torch.equal(model.reward_transform_matrix, torch.eye(ARMORM_NUM_OBJECTIVES))


def test_gating_depends_on_prompt_only(armorm_dir):
    # Same instruction, different responses: the gate reads the token closing the user
    # turn, which a causal model computes before seeing the response.
    results = RewardModelScorer(str(armorm_dir)).score_detailed(
        [INSTRUCTIONS[0], INSTRUCTIONS[4]], [RESPONSES[0], RESPONSES[4]]
    )
    assert results[0].gating_weights == pytest.approx(results[1].gating_weights, abs=1e-6)
    assert results[0].objective_rewards != pytest.approx(results[1].objective_rewards, abs=1e-3)
    assert sum(results[0].gating_weights) == pytest.approx(1.7, abs=1e-5)  # softmax * logit_scale


def test_batched_equals_single_and_order_is_kept(armorm_dir):
    single = RewardModelScorer(str(armorm_dir), batch_size=1).score(INSTRUCTIONS, RESPONSES)
    batched = RewardModelScorer(str(armorm_dir), batch_size=4).score(INSTRUCTIONS, RESPONSES)
    assert batched == pytest.approx(single, abs=1e-5)
    reversed_scores = RewardModelScorer(str(armorm_dir), batch_size=4).score(INSTRUCTIONS[::-1], RESPONSES[::-1])
    assert reversed_scores[::-1] == pytest.approx(single, abs=1e-5)


def test_length_sorted_batches(armorm_dir, monkeypatch):
    scorer = RewardModelScorer(str(armorm_dir), batch_size=2)
    widths: list[list[int]] = []
    original = scorer._forward

    def spy(rows, gating):
        widths.append([len(r) for r in rows])
        return original(rows, gating)

    monkeypatch.setattr(scorer, "_forward", spy)
    scorer.score(INSTRUCTIONS, RESPONSES)
    flat = [w for batch in widths for w in batch]
    assert flat == sorted(flat, reverse=True)
    assert [len(b) for b in widths] == [2, 2, 1]


def test_module_forward_with_published_pattern_api(armorm_dir):
    # Direct module use, as the published model is called: ids in, .score/.rewards out.
    model = load_armorm(armorm_dir)
    tokenizer = AutoTokenizer.from_pretrained(armorm_dir)
    model.gating_token_pattern = tuple(
        tokenizer("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    )
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": INSTRUCTIONS[3]}, {"role": "assistant", "content": RESPONSES[3]}], tokenize=False
    )
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        output = model(ids)
    expected = expected_outputs(armorm_dir, INSTRUCTIONS[3], RESPONSES[3])
    assert output.score.item() == pytest.approx(expected["score"].item(), abs=1e-5)
    model.gating_token_pattern = (10**6,)
    with pytest.raises(ValueError, match="Token pattern not found"):
        model(ids)


LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def test_gating_pattern_from_llama3_template(tmp_path):
    # ArmoRM's tokenizer uses the Llama-3 template; the derived pattern must be the
    # published one: "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n".
    tokenizer = make_tokenizer(tmp_path)
    tokenizer.add_special_tokens(
        {
            "bos_token": "<|begin_of_text|>",
            "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        }
    )
    tokenizer.chat_template = LLAMA3_TEMPLATE
    pattern = gating_pattern_from_template(tokenizer)
    expected = tokenizer("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", add_special_tokens=False)
    assert pattern == tuple(expected["input_ids"])
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": " What is 6 times 7? "}, {"role": "assistant", "content": "42"}], tokenize=False
    )
    assert text.startswith("<|begin_of_text|><|start_header_id|>user")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    position = find_gating_position(ids, pattern)
    # The gate reads the <|eot_id|> that closes the user turn (the first of the two).
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert ids[position] == eot and ids.index(eot) == position


def test_find_gating_position_takes_last_occurrence():
    assert find_gating_position([5, 1, 2, 9, 1, 2, 7], [1, 2]) == 4
    assert find_gating_position([5, 1, 9], [1, 2]) is None


def test_missing_pattern_after_truncation_gives_nan(armorm_dir):
    scorer = RewardModelScorer(str(armorm_dir), max_length=8)
    results = scorer.score_detailed(["a long instruction that gets truncated " * 3, "Hi"], ["ok", "ok"])
    assert all(math.isnan(r.score) for r in results)
    assert [r.truncated for r in results] == [True, True]


def _copy_checkpoint(src, dst, *, drop_tensor: str | None = None, drop_key: str | None = None, arch=None):
    dst.mkdir()
    for file in src.iterdir():
        (dst / file.name).write_bytes(file.read_bytes())
    if drop_tensor:
        tensors = load_file(str(dst / "model.safetensors"))
        del tensors[drop_tensor]
        save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    if drop_key:
        del config[drop_key]
    if arch:
        config["architectures"] = arch
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_layout_errors(armorm_dir, tmp_path):
    with pytest.raises(TPODataError, match="missing.*reward_transform_matrix"):
        load_armorm(_copy_checkpoint(armorm_dir, tmp_path / "a", drop_tensor="reward_transform_matrix"))
    with pytest.raises(TPODataError, match="num_objectives"):
        load_armorm(_copy_checkpoint(armorm_dir, tmp_path / "b", drop_key="num_objectives"))
    with pytest.raises(TPODataError, match="not in ArmoRM layout"):
        load_armorm(_copy_checkpoint(armorm_dir, tmp_path / "c", arch=["LlamaForCausalLM"]))
    with pytest.raises(TPODataError, match="config.json"):
        load_armorm(tmp_path)
    mismatched = _copy_checkpoint(armorm_dir, tmp_path / "d")
    config = json.loads((mismatched / "config.json").read_text())
    config["gating_hidden_dim"] = 48  # the tensors were saved with 32
    (mismatched / "config.json").write_text(json.dumps(config))
    with pytest.raises(TPODataError, match="ArmoRM"):
        load_armorm(mismatched)
    with pytest.raises(TPODataError, match="kind='armorm'"):
        RewardModelScorer(str(armorm_dir), kind="sequence_classification")


def test_checkpoint_without_architectures(armorm_dir, tmp_path):
    """Older checkpoints omit config.json's architectures: an explicit kind='armorm' loads them,
    and the weight check still refuses a folder without ArmoRM's tensors."""
    folder = _copy_checkpoint(armorm_dir, tmp_path / "no-arch")
    config = json.loads((folder / "config.json").read_text())
    del config["architectures"]
    (folder / "config.json").write_text(json.dumps(config))
    expected = RewardModelScorer(str(armorm_dir)).score(INSTRUCTIONS, RESPONSES)
    assert RewardModelScorer(str(folder), kind="armorm").score(INSTRUCTIONS, RESPONSES) == expected
    with pytest.raises(TPODataError, match="missing"):
        load_armorm(_copy_checkpoint(folder, tmp_path / "no-arch-no-head", drop_tensor="regression_layer.weight"))


def test_published_gating_defaults(armorm_dir, tmp_path):
    # The published code reads gating_temperature with a default of 10.
    folder = _copy_checkpoint(armorm_dir, tmp_path / "defaults", drop_key="gating_temperature")
    assert load_armorm(folder).gating.temperature == 10.0

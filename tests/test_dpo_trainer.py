"""trainers/dpo.py: DPO on a store version and on a Hub revision, IRPO, and refused inputs.

The two training runs go through the script in a subprocess, as a user runs it;
the Hub run talks to tests/hub_standin.py with the real ``datasets`` and
``huggingface_hub`` clients (their endpoint is read at import time). The
refusals run in-process: they fail before any model is loaded.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import REPO, run_script
from hub_standin import HubStandin
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import ModelConfig
from test_hub import PUBLISH, TOKEN, client_env
from test_store import RECIPE, make_iteration

from tpo_data import cli
from tpo_data.card import card_metadata
from tpo_data.errors import TPODataError
from tpo_data.store import LocalStore, write_iteration
from tpo_data.training import apply_irpo, check_mergeable, main, parse_args

SCRIPT = "trainers/dpo.py"
TINY = ["--config", "recipes/dpo-tiny-test.yaml"]


@pytest.fixture(scope="module")
def store(tiny_lm: Path, tmp_path_factory: pytest.TempPathFactory) -> LocalStore:
    """iter-1 with the tiny model as its parent, plus two broken versions."""
    local = LocalStore(tmp_path_factory.mktemp("train") / "store")
    pairs, candidates = make_iteration(1, n_instructions=8)
    write_iteration(
        local, "iter-1", pairs=pairs, candidates=candidates, iteration=1,
        parent_model=str(tiny_lm), recipe=RECIPE, seed=0, instruction_slice=None,
    )
    manifest = {"iteration": 1, "parent_model": str(tiny_lm)}
    card = f"---\n{yaml.safe_dump(card_metadata(['pairs']))}---\n"
    local.write_version("no-rejected", {"pairs": pairs.remove_columns("rejected")}, manifest, card)
    local.write_version("empty", {"pairs": pairs.select([])}, manifest, card)
    return local


def train_args(store: LocalStore, out: Path, *extra: str) -> list[str]:
    return [*TINY, "--dataset_store", str(store.root), "--dataset_version", "iter-1",
            "--output_dir", str(out), *extra]


def read_outputs(out: Path) -> tuple[str, dict[str, Any], list[float]]:
    """Card text, lineage and the per-step training losses of a finished run."""
    for name in ("model.safetensors", "config.json", "tokenizer.json", "README.md"):
        assert (out / name).is_file(), f"{name} was not saved"
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    return (out / "README.md").read_text(), json.loads((out / "lineage.json").read_text()), losses


def assert_weights_changed(parent: Path, out: Path) -> None:
    before, after = load_file(parent / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    assert any(not before[name].equal(after[name]) for name in before)


def test_trains_from_store_version_with_irpo(store: LocalStore, tiny_lm: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    result = run_script(SCRIPT, *train_args(store, out, "--irpo_alpha", "1.0"), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    card, lineage, losses = read_outputs(out)
    # Step 1: policy == reference, so DPO is log 2 and the rest is the NLL of the chosen
    # completion under a random model (about log |vocab|): the "sft" term is in the loss.
    assert losses[0] > math.log(2) + 2.0
    assert lineage["training"]["loss_type"] == ["sigmoid", "sft"]
    assert lineage["training"]["loss_weights"] == [1.0, 1.0]
    assert lineage["dataset"]["source"] == "store" and lineage["dataset"]["version"] == "iter-1"
    assert lineage["dataset"]["manifest_sha256"] and lineage["iteration"] == 1
    assert lineage["parent_model"] == str(tiny_lm)  # taken from the manifest
    assert math.isfinite(lineage["metrics"]["train_loss"])
    assert f"iter-1 of local store {store.root.resolve()}" in card
    assert str(tiny_lm) in card and '["sigmoid", "sft"]' in card and "train_loss" in card
    assert_weights_changed(tiny_lm, out)


def test_two_processes_share_the_data_and_save_once(store: LocalStore, tiny_lm: Path, tmp_path: Path) -> None:
    """Under a distributed launcher (torchrun here, on CPU with gloo; `accelerate launch` starts the
    same kind of processes on GPUs) both ranks train on their shard, one process writes the outputs,
    and the best checkpoint on held-out pairs is the one recorded."""
    out = tmp_path / "model"
    result = run_script(
        "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", SCRIPT,
        *train_args(store, out, "--eval_split", "0.25", "--eval_strategy", "steps", "--eval_steps", "1",
                    "--save_strategy", "steps", "--save_steps", "1", "--load_best_model_at_end", "true"),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    card, lineage, losses = read_outputs(out)
    assert result.stdout.count("model saved to") == 1
    assert lineage["training"]["world_size"] == 2 and lineage["training"]["effective_batch_size"] == 4
    state = json.loads((out / "trainer_state.json").read_text())
    # Each rank sees ceil(rows / 2) pairs in batches of 2; one process alone would need twice the steps.
    rows = lineage["train_rows"]
    assert rows >= 3 and rows + lineage["eval"]["rows"] == store.load("iter-1", "pairs").num_rows
    assert state["global_step"] == 2 and state["epoch"] == pytest.approx(2 / math.ceil(math.ceil(rows / 2) / 2))
    best = Path(state["best_model_checkpoint"])
    assert lineage["best_checkpoint"] == best.name and (out / best.name / "model.safetensors").is_file()
    assert math.isfinite(lineage["metrics"]["eval_loss"]) and "world_size | 2" in card
    assert_weights_changed(tiny_lm, out)


def test_process_group_ends_after_the_trainer_is_gone(
    store: LocalStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process group is destroyed only once no trainer (and so no DDP reducer) is left: a
    reducer freed after its gloo group hung a torchrun run at exit (Trainer.end() order)."""
    from accelerate import PartialState
    from transformers import Trainer

    def trainers() -> int:
        return sum(isinstance(o, Trainer) for o in gc.get_objects())

    alive_at_destroy, before = [], trainers()
    monkeypatch.setattr(PartialState, "destroy_process_group",
                        lambda self, group=None: alive_at_destroy.append(trainers()))
    out = main(train_args(store, tmp_path / "model"))
    assert alive_at_destroy == [before] and (out / "lineage.json").is_file()


def test_trains_from_hub_revision(store: LocalStore, tiny_lm: Path, tmp_path: Path) -> None:
    repo = "stand-in-user/tpo-train"
    with HubStandin(tmp_path / "hub") as hub:
        env = client_env(tmp_path, hub.url, TOKEN)
        published = subprocess.run(
            [sys.executable, "-c", PUBLISH,
             json.dumps({"store": str(store.root), "version": "iter-1", "repo": repo})],
            env=env, capture_output=True, text=True, timeout=120,
        )
        commit = json.loads(published.stdout.strip().splitlines()[-1])["commit"]
        out = tmp_path / "model"
        result = subprocess.run(
            [sys.executable, SCRIPT, *TINY, "--dataset_repo", repo, "--dataset_revision", "iter-1",
             "--output_dir", str(out)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
        )
    assert result.returncode == 0, result.stderr[-3000:]
    assert TOKEN not in result.stdout + result.stderr
    card, lineage, losses = read_outputs(out)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)  # plain DPO, policy == reference
    assert lineage["dataset"] == {
        "source": "hub", "repo": repo, "revision": "iter-1", "commit": commit,
        "manifest_sha256": store.manifest_sha256("iter-1"), "config": "pairs",
    }
    assert lineage["parent_model"] == str(tiny_lm) and lineage["training"]["loss_type"] == ["sigmoid"]
    assert f"{repo}@iter-1 (commit {commit})" in card and str(tiny_lm) in card
    assert "datasets:\n- stand-in-user/tpo-train" in card
    assert_weights_changed(tiny_lm, out)

    # Compute nodes often run offline on cached data: the Hub is gone (stand-in stopped) and
    # HF_HUB_OFFLINE is set; the revision still resolves to the same commit from the cache.
    offline = subprocess.run(
        [sys.executable, SCRIPT, *TINY, "--dataset_repo", repo, "--dataset_revision", "iter-1",
         "--output_dir", str(tmp_path / "offline")],
        cwd=REPO, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert offline.returncode == 0, offline.stderr[-3000:]
    assert read_outputs(tmp_path / "offline")[1]["dataset"] == lineage["dataset"]


def test_lora_run_saves_the_adapter_and_the_merged_model(store: LocalStore, tiny_lm: Path, tmp_path: Path) -> None:
    """--use_peft: output_dir holds a full model (what the next iteration loads) equal to the parent
    plus (alpha / r) * B @ A of the saved adapter, computed here from the adapter's own tensors."""
    out = tmp_path / "model"
    result = run_script(SCRIPT, *train_args(store, out, "--use_peft", "--lora_r", "4", "--lora_alpha", "8",
                                            "--lora_target_modules", "q_proj", "v_proj"), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    card, lineage, _ = read_outputs(out)
    assert not (out / "adapter_config.json").exists()  # else transformers would load out as an adapter
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    parent, merged = load_file(tiny_lm / "model.safetensors"), load_file(out / "model.safetensors")
    assert parent.keys() == merged.keys()
    lora = {}
    for key, tensor in adapter.items():  # base_model.model.<module>.lora_A.weight
        module, part = key.removeprefix("base_model.model.").rsplit(".lora_", 1)
        lora.setdefault(f"{module}.weight", {})[part.split(".")[0]] = tensor
    assert sorted(lora) == sorted(k for k in parent if k.endswith(("q_proj.weight", "v_proj.weight")))
    assert any(ab["B"].abs().max() > 0 for ab in lora.values())  # training moved the adapter
    for name, weight in parent.items():
        expected = weight + 2.0 * lora[name]["B"] @ lora[name]["A"] if name in lora else weight
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)
    assert lineage["adapter"] == {
        "folder": "adapter", "merged": True, "r": 4, "alpha": 8, "dropout": 0.05,
        "target_modules": ["q_proj", "v_proj"], "modules_to_save": None, "use_dora": False,
        "use_rslora": False, "load_in_4bit": False, "load_in_8bit": False, "dtype": "float32"}
    assert "| LoRA adapter | `adapter/` (r=4, alpha=8), merged into this model |" in card
    # What the next iteration does with M_t: load it as a plain model, with its tokenizer.
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM" and AutoTokenizer.from_pretrained(out).eos_token
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.weight,
                               merged["model.layers.0.self_attn.q_proj.weight"])


def test_push_to_hub_publishes_the_finished_model(store: LocalStore, tiny_lm: Path, tmp_path: Path) -> None:
    """--push_to_hub uploads the model as the next iteration loads it: merged weights with lineage.json
    and the card, the adapter in adapter/ only (transformers' own push put its files beside the
    merged model, which then loads as an adapter over itself), no checkpoints, no token."""
    repo = "stand-in-user/tpo-model"
    out = tmp_path / "model"
    with HubStandin(tmp_path / "hub") as hub:
        env = client_env(tmp_path, hub.url, TOKEN)
        result = subprocess.run(
            [sys.executable, SCRIPT, *train_args(store, out, "--use_peft", "--lora_r", "4",
                                                 "--save_strategy", "steps", "--save_steps", "1",
                                                 "--push_to_hub", "true", "--hub_model_id", repo,
                                                 "--hub_token", TOKEN)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        head = hub.repo(repo, "model").resolve("main")
        files = hub.repo(repo, "model").commits[head].files
        published = {name: hub.read_file(repo, "main", name, "model") for name in files}
        state = json.dumps(hub.state())
    assert f"published to the Hub: {repo} (commit {head})" in result.stdout
    assert any(out.glob("checkpoint-*")) and not any(name.startswith("checkpoint-") for name in files)
    assert "adapter_config.json" not in files and "adapter/adapter_config.json" in files
    for name in ("model.safetensors", "config.json", "lineage.json", "README.md", "adapter/adapter_model.safetensors"):
        assert published[name] == (out / name).read_bytes(), name
    assert json.loads(published["lineage.json"])["adapter"]["merged"] is True
    assert TOKEN not in result.stdout + result.stderr + state
    # The Trainer pickles its arguments into training_args.bin: the token must not be in them.
    assert "adapter/training_args.bin" in files
    assert not any(TOKEN.encode() in data for data in published.values())
    assert not any(TOKEN.encode() in f.read_bytes() for f in out.rglob("*") if f.is_file())


def test_resume_refuses_a_checkpoint_of_other_data(store: LocalStore, tmp_path: Path) -> None:
    """--resume_from_checkpoint continues on the data the run started on; a checkpoint trained on
    other pairs would be finished on these with a lineage naming only these."""
    out = tmp_path / "model"
    assert main(train_args(store, out, "--save_strategy", "steps", "--save_steps", "1")) == out
    recorded = json.loads((out / "training_data.json").read_text())
    assert recorded["version"] == "iter-1" and recorded["manifest_sha256"] == store.manifest_sha256("iter-1")
    other = LocalStore(tmp_path / "other")
    pairs, candidates = make_iteration(1, n_instructions=6)
    write_iteration(other, "iter-1", pairs=pairs, candidates=candidates, iteration=1,
                    parent_model=recorded["parent_model"], recipe=RECIPE, seed=0, instruction_slice=None)
    resume = ["--resume_from_checkpoint", str(out / "checkpoint-2")]
    with pytest.raises(TPODataError, match="belongs to a run on other data or another parent model: manifest_sha256"):
        main([*TINY, "--dataset_store", str(other.root), "--dataset_version", "iter-1",
              "--output_dir", str(out), *resume])
    # The same data resumes (the run is complete: nothing is left to train, the model is saved again).
    assert main(train_args(store, out, *resume)) == out


def test_a_refused_run_leaves_output_dir_for_the_rerun(store: LocalStore, tmp_path: Path) -> None:
    """Refused after the model loaded (every prompt fills max_length): nothing is recorded, so the
    corrected rerun in the same output_dir is not told the folder is taken."""
    out = tmp_path / "model"
    with pytest.raises(TPODataError, match="raise --max_length"):
        main(train_args(store, out, "--max_length", "4"))
    assert not (out / "training_data.json").exists()
    assert main(train_args(store, out)) == out


def test_push_to_hub_needs_a_model_id(store: LocalStore, tmp_path: Path) -> None:
    with pytest.raises(TPODataError, match="--hub_model_id your-user/model-name"):
        main(train_args(store, tmp_path / "model", "--push_to_hub", "true"))
    assert not (tmp_path / "model" / "lineage.json").exists()


def test_lora_refuses_a_quantized_parent(tiny_lm: Path, tmp_path: Path) -> None:
    parent = tmp_path / "bnb-4bit"
    parent.mkdir()
    config = json.loads((tiny_lm / "config.json").read_text())
    (parent / "config.json").write_text(json.dumps({**config, "quantization_config": {"load_in_4bit": True}}))
    with pytest.raises(TPODataError, match="stored quantized") as err:
        check_mergeable(ModelConfig(use_peft=True), parent)
    assert "--load_in_4bit" in err.value.fix
    check_mergeable(ModelConfig(use_peft=False), parent)  # a full fine-tune does not merge anything
    check_mergeable(ModelConfig(use_peft=True), tiny_lm)


def test_lora_needs_peft(store: LocalStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else find_spec(name, *a))
    with pytest.raises(TPODataError, match="--use_peft needs the peft library") as err:
        main(train_args(store, tmp_path / "m", "--use_peft"))
    assert "tpo-data[peft]" in err.value.fix and not (tmp_path / "m").exists()


def test_qlora_needs_bitsandbytes(store: LocalStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a))
    with pytest.raises(TPODataError, match="--load_in_4bit .QLoRA. needs the bitsandbytes library") as err:
        main(train_args(store, tmp_path / "m", "--use_peft", "--load_in_4bit"))
    assert "pip install bitsandbytes" in err.value.fix and not (tmp_path / "m").exists()


def test_refuses_non_empty_output_dir(store: LocalStore, tmp_path: Path) -> None:
    out = tmp_path / "model"
    for folder in ("checkpoint-7", "adapter"):
        (out / folder).mkdir(parents=True)
    (out / "lineage.json").write_text("{}")
    with pytest.raises(TPODataError, match="exists and is not empty") as err:
        main(train_args(store, out))
    assert "--overwrite_output_dir" in err.value.fix
    # With the flag, stale checkpoints, adapter and lineage (the loop's "finished" mark) go
    # before the run (which then fails here on purpose).
    with pytest.raises(TPODataError, match="not found"):
        main([*train_args(store, out, "--overwrite_output_dir"), "--dataset_version", "iter-9"])
    assert not any((out / name).exists() for name in ("checkpoint-7", "adapter", "lineage.json"))


def test_missing_version_lists_the_existing_ones(store: LocalStore, tmp_path: Path) -> None:
    with pytest.raises(TPODataError, match="existing versions: empty, iter-1, no-rejected"):
        main([*train_args(store, tmp_path / "m"), "--dataset_version", "iter-9"])


@pytest.mark.parametrize(
    ("version", "problem"),
    [("no-rejected", "lack the column\\(s\\) rejected"), ("empty", "has no pairs")],
)
def test_bad_pairs_are_refused(store: LocalStore, tmp_path: Path, version: str, problem: str) -> None:
    with pytest.raises(TPODataError, match=problem):
        main([*train_args(store, tmp_path / "m"), "--dataset_version", version])


def test_dataset_source_must_be_one_and_complete(store: LocalStore, tmp_path: Path) -> None:
    with pytest.raises(TPODataError, match="no dataset given"):
        main([*TINY, "--output_dir", str(tmp_path / "m")])
    with pytest.raises(TPODataError, match="needs both --dataset_repo and --dataset_revision"):
        main([*TINY, "--dataset_repo", "u/r", "--output_dir", str(tmp_path / "m")])
    with pytest.raises(TPODataError, match="both a local store"):
        main([*train_args(store, tmp_path / "m"), "--dataset_repo", "u/r"])


def test_evaluation_needs_held_out_pairs(store: LocalStore, tmp_path: Path) -> None:
    with pytest.raises(TPODataError, match="no pairs are held out") as err:
        main([*train_args(store, tmp_path / "m"), "--eval_strategy", "epoch"])
    assert "--eval_split" in err.value.fix


def test_script_names_a_mistyped_flag(tmp_path: Path) -> None:
    proc = run_script(SCRIPT, "--config", "recipes/dpo-smollm2.yaml", "--num_train_epoch", "3",
                      "--output_dir", str(tmp_path / "m"), timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Unknown option(s): --num_train_epoch 3" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "m").exists()


def test_cpu_defaults_and_overrides() -> None:
    script_args, args, _ = parse_args(["--config", "recipes/dpo-smollm2.yaml", "--output_dir", "x"])
    assert args.use_cpu and not args.bf16 and not args.gradient_checkpointing
    assert args.precompute_ref_log_probs and not args.load_best_model_at_end
    assert args.num_train_epochs == 4 and script_args.irpo_alpha == 1.0
    # The recipe's own suggestion for real data: best epoch on held-out pairs.
    _, args, _ = parse_args(["--config", "recipes/dpo-smollm2.yaml", "--output_dir", "x",
                             "--eval_strategy", "epoch", "--save_strategy", "epoch",
                             "--load_best_model_at_end", "true", "--metric_for_best_model", "eval_loss"])
    assert args.load_best_model_at_end and args.metric_for_best_model == "eval_loss"
    _, args, _ = parse_args(["--output_dir", "x", "--precompute_ref_log_probs", "false"])
    assert not args.precompute_ref_log_probs


def test_irpo_maps_onto_the_loss_list() -> None:
    script_args, args, _ = parse_args(["--output_dir", "x", "--irpo_alpha", "0.5"])
    apply_irpo(script_args, args)
    assert args.loss_type == ["sigmoid", "sft"] and args.loss_weights == [1.0, 0.5]
    with pytest.raises(TPODataError, match="already contains 'sft'"):
        apply_irpo(script_args, args)
    # The shipped recipe sets irpo_alpha; TRL's own spelling of the NLL term names the way out.
    script_args, args, _ = parse_args(["--config", str(REPO / "recipes" / "dpo-smollm2.yaml"), "--output_dir", "x",
                                       "--loss_type", "sigmoid", "sft", "--loss_weights", "1", "0.5"])
    with pytest.raises(TPODataError, match=r"(?s)irpo_alpha is 1.0 \(the recipe's value.*pass --irpo_alpha 0"):
        apply_irpo(script_args, args)
    script_args.irpo_alpha = 0.0
    apply_irpo(script_args, args)
    assert args.loss_type == ["sigmoid", "sft"] and args.loss_weights == [1.0, 0.5]


def test_tpo_data_train_command(store: LocalStore, tmp_path: Path, capsys) -> None:
    assert cli.main(["train", *train_args(store, tmp_path / "m"), "--dataset_version", "iter-9"]) == 2
    assert "version 'iter-9' not found" in capsys.readouterr().err


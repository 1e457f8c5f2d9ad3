"""Torch references of DeepSeek-V4's CPU routing ops (`_C::hash_topk_cpu`, `_C::biased_topk_cpu`).

Semantics from vLLM 0.32.0 csrc/cpu/sgl-kernels/topk.cpp (the stock kernels): scores are
computed in fp32 from the router logits; hash-routed layers take their experts from the
`tid2eid` rows, other layers pick the top-k of score + correction bias; the returned weights are
the unbiased scores of the chosen experts, renormalized to sum to routed_scaling_factor.
The stock kernels are compiled only for num_experts in {64, 128, 256, 384} and a few top-k
values, and exist only in the AVX-512 kernel library; these references take any shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# (num_experts, routed top-k) pairs the stock kernels are instantiated for (topk.cpp).
STOCK_HASH_SHAPES = {(e, k) for e in (64, 128, 256, 384) for k in (6, 7, 8)}
STOCK_BIASED_SHAPES = {(e, k) for e in (64, 128, 384) for k in (6, 8)} | {(256, 6), (256, 8), (256, 9)}


def _scores(logits: torch.Tensor, scoring_func: str) -> torch.Tensor:
    x = logits.to(torch.float32)
    if scoring_func == "sqrtsoftplus":
        return F.softplus(x).sqrt()  # softplus returns x above 20, as the kernel does
    if scoring_func == "sigmoid":
        return torch.sigmoid(x)
    if scoring_func == "softmax":
        return torch.softmax(x, dim=-1)
    raise ValueError(f"unsupported scoring_func {scoring_func!r}")


def hash_topk(gating_output: torch.Tensor, tid2eid: torch.Tensor, topk: int, scoring_func: str,
              num_fused_shared_experts: int, num_experts: int, routed_scaling_factor: float
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights [T, topk] fp32 and ids [T, topk] int32 of hash-routed tokens (tid2eid [T, topk])."""
    if num_fused_shared_experts:
        raise NotImplementedError("hash_topk: fused shared experts never occur on vLLM's CPU path")
    if gating_output.shape[1] != num_experts or tid2eid.shape != (gating_output.shape[0], topk):
        raise ValueError(f"hash_topk: gating {tuple(gating_output.shape)}, tid2eid "
                         f"{tuple(tid2eid.shape)}, topk {topk}, num_experts {num_experts} disagree")
    ids = tid2eid.to(torch.int64)
    weights = _scores(gating_output, scoring_func).gather(1, ids)
    if scoring_func != "softmax":  # renormalize (only rows with a positive sum, as the kernel)
        total = weights.sum(-1, keepdim=True)
        weights = torch.where(total > 0, weights * (routed_scaling_factor / total), weights)
    return weights, ids.to(torch.int32)


def biased_topk(hidden_states: torch.Tensor, gating_output: torch.Tensor,
                correction_bias: torch.Tensor, topk: int, renormalize: bool, scoring_func: str,
                num_fused_shared_experts: int, routed_scaling_factor: float | None,
                apply_routed_scaling_factor_on_output: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of score + bias; weights are the unbiased scores (optionally renormalized)."""
    if num_fused_shared_experts:
        raise NotImplementedError("biased_topk: fused shared experts never occur on vLLM's CPU path")
    if scoring_func not in ("sigmoid", "sqrtsoftplus"):
        raise ValueError(f"biased_topk: unsupported scoring_func {scoring_func!r}")
    scores = _scores(gating_output, scoring_func)
    ids = torch.topk(scores + correction_bias.to(torch.float32), topk, dim=-1).indices
    weights = scores.gather(1, ids)
    if renormalize:
        scale = 1.0 / weights.sum(-1, keepdim=True)
        if apply_routed_scaling_factor_on_output:
            scale = scale * (routed_scaling_factor or 0.0)
        weights = weights * scale
    return weights, ids.to(torch.int32)


def stock_op_available(name: str) -> bool:
    return hasattr(torch.ops._C, name)

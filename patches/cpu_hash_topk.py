"""DeepSeek-V4 hash routing on CPU for any expert count, with or without the AVX-512 kernel."""

from __future__ import annotations

import functools

from vllm_ampere.cpu import is_cpu_platform
from vllm_ampere.cpu.routing import STOCK_HASH_SHAPES, hash_topk, stock_op_available
from vllm_ampere.patching import Patch


def _replace(stock):
    @functools.wraps(stock)
    def hash_topk_any_shape(gating_output, tid2eid, topk, scoring_func, num_fused_shared_experts,
                            num_experts, routed_scaling_factor):
        if stock_op_available("hash_topk_cpu") and (num_experts, topk - num_fused_shared_experts) in STOCK_HASH_SHAPES:
            return stock(gating_output, tid2eid, topk, scoring_func, num_fused_shared_experts,
                         num_experts, routed_scaling_factor)
        return hash_topk(gating_output, tid2eid, topk, scoring_func, num_fused_shared_experts,
                         num_experts, routed_scaling_factor)

    return hash_topk_any_shape


PATCH = Patch(
    name="cpu_hash_topk",
    target="vllm.model_executor.layers.fused_moe.router.cpu_router:hash_topk_cpu",
    signature="(gating_output: torch.Tensor, tid2eid: torch.Tensor, topk: int, scoring_func: str, "
    "num_fused_shared_experts: int, num_experts: int, routed_scaling_factor: float) -> "
    "tuple[torch.Tensor, torch.Tensor]",
    why="The CPU router's hash-routed layers call _C::hash_topk_cpu, which exists only in the "
    "AVX-512 kernel library and is compiled only for 64/128/256/384 experts and top-6/7/8; on "
    "AVX2 CPUs, and for small test models, routing fails.",
    how="cpu_router.hash_topk_cpu uses the stock kernel where it exists for the shape, else "
    "vllm_ampere.cpu.routing.hash_topk (same weights and ids, in torch).",
    vllm_checked="0.32.0",
    processes=("workers",),
    remove_when="vLLM's AVX2 build ships hash_topk_cpu with a generic-shape fallback.",
    replace=_replace,
    needed=is_cpu_platform,
)

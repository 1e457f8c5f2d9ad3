"""DeepSeek-V4 bias-corrected routing on CPU for any expert count, with or without AVX-512."""

from __future__ import annotations

import functools

from vllm_ampere.cpu import is_cpu_platform
from vllm_ampere.cpu.routing import STOCK_BIASED_SHAPES, biased_topk, stock_op_available
from vllm_ampere.patching import Patch


def _replace(stock):
    @functools.wraps(stock)
    def biased_topk_any_shape(hidden_states, gating_output, correction_bias, topk, renormalize,
                              scoring_func, num_fused_shared_experts, routed_scaling_factor,
                              apply_routed_scaling_factor_on_output):
        args = (hidden_states, gating_output, correction_bias, topk, renormalize, scoring_func,
                num_fused_shared_experts, routed_scaling_factor, apply_routed_scaling_factor_on_output)
        shape = (gating_output.shape[1], topk - num_fused_shared_experts)
        if stock_op_available("biased_topk_cpu") and shape in STOCK_BIASED_SHAPES:
            return stock(*args)
        return biased_topk(*args)

    return biased_topk_any_shape


PATCH = Patch(
    name="cpu_biased_topk",
    target="vllm.model_executor.layers.fused_moe.router.cpu_router:biased_topk_cpu",
    signature="(hidden_states: torch.Tensor, gating_output: torch.Tensor, correction_bias: "
    "torch.Tensor, topk: int, renormalize: bool, scoring_func: str, num_fused_shared_experts: "
    "int, routed_scaling_factor: float | None, apply_routed_scaling_factor_on_output: bool) -> "
    "tuple[torch.Tensor, torch.Tensor]",
    why="The CPU router's bias-corrected layers call _C::biased_topk_cpu, which exists only in "
    "the AVX-512 kernel library and is compiled only for 64/128/256/384 experts and a few "
    "top-k values; on AVX2 CPUs, and for small test models, routing fails.",
    how="cpu_router.biased_topk_cpu uses the stock kernel where it exists for the shape, else "
    "vllm_ampere.cpu.routing.biased_topk (same weights and ids, in torch).",
    vllm_checked="0.32.0",
    processes=("workers",),
    remove_when="vLLM's AVX2 build ships biased_topk_cpu with a generic-shape fallback.",
    replace=_replace,
    needed=is_cpu_platform,
)

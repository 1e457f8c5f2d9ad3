"""The one record behind dsv4_int_cuda_wo_a_o_proj{,_flashinfer}: the same wrap of
`deep_gemm_fp8_o_proj` where each CUDA attention module looks the name up (each imports its own
binding from nvidia/ops/o_proj.py, so patching one leaves the other stock)."""

from __future__ import annotations

import functools

from vllm_ampere.patching import Patch


def _replace(o_proj):
    @functools.wraps(o_proj)
    def o_proj_dsv4_int(o, positions, cos_sin_cache, wo_a, wo_b, *, n_groups, heads_per_group, nope_dim,
                        rope_dim, o_lora_rank, einsum_recipe, tma_aligned_scales):
        from vllm_ampere.quant.wo_a import int8_o_proj, is_int8_wo_a

        if not is_int8_wo_a(wo_a):
            return o_proj(o, positions, cos_sin_cache, wo_a, wo_b, n_groups=n_groups,
                          heads_per_group=heads_per_group, nope_dim=nope_dim, rope_dim=rope_dim,
                          o_lora_rank=o_lora_rank, einsum_recipe=einsum_recipe,
                          tma_aligned_scales=tma_aligned_scales)
        return int8_o_proj(o, positions, cos_sin_cache, wo_a, wo_b, n_groups=n_groups,
                           heads_per_group=heads_per_group, nope_dim=nope_dim, rope_dim=rope_dim,
                           quant_group_size=einsum_recipe[2], tma_aligned_scales=tma_aligned_scales)

    return o_proj_dsv4_int


def o_proj_patch(name: str, module: str, attention: str) -> Patch:
    return Patch(
        name=name,
        target=f"{module}:deep_gemm_fp8_o_proj",
        signature="(o: torch.Tensor | vllm.model_executor.layers.fusion.quant_activation.QuantizedActivation, "
        "positions: torch.Tensor, cos_sin_cache: torch.Tensor, wo_a: torch.nn.modules.module.Module, "
        "wo_b: collections.abc.Callable[[torch.Tensor], torch.Tensor], *, n_groups: int, heads_per_group: int, "
        "nope_dim: int, rope_dim: int, o_lora_rank: int, einsum_recipe: tuple[int, int, int], "
        "tma_aligned_scales: bool) -> torch.Tensor",
        why=f"{attention} calls deep_gemm_fp8_o_proj, which reads wo_a.weight directly: an FP8 einsum "
        "for FP8 weights, else a BF16 bmm on the raw weight. A dsv4_int wo_a holds packed INT8 there "
        "(a dtype error in the bmm), and the only stock alternative is dequantizing it to BF16 for "
        "good (what the reference fork does). Our sm_8x attention class has its own _o_proj.",
        how="When wo_a's quant method is dsv4_int's INT8 linear method, runs the stock inverse RoPE "
        "unquantized and then wo_a group by group through that method (our W8A16 GEMM or Marlin "
        f"W8A16), then wo_b; any other wo_a takes the stock function. Patched where {module} looks "
        "the name up (it imports it from nvidia/ops/o_proj.py).",
        vllm_checked="0.32.0",
        processes=("workers",),
        remove_when="vLLM's DeepSeek-V4 output projection calls wo_a's quant method for a grouped "
        "product instead of reading its weight.",
        replace=_replace,
    )

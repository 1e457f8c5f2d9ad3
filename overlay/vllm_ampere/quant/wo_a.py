"""DeepSeek-V4's output projection with a dsv4_int INT8 `wo_a` (CUDA attention backends).

The stock CUDA path (nvidia/ops/o_proj.py: deep_gemm_fp8_o_proj) undoes the query RoPE on the
attention output and then multiplies each of the n_groups head groups by its block of wo_a's
rows, reading `wo_a.weight` directly (an FP8 einsum, or a BF16 bmm). Here the same inverse RoPE
runs unquantized and the grouped product goes through the INT8 method's own kernel path.
"""

from __future__ import annotations

from typing import Callable

import torch

from vllm_ampere.quant.linear_w8a16 import Dsv4Int8LinearMethod


def is_int8_wo_a(wo_a: torch.nn.Module) -> bool:
    return isinstance(getattr(wo_a, "quant_method", None), Dsv4Int8LinearMethod)


def int8_o_proj(o: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, wo_a: torch.nn.Module,
                wo_b: Callable[[torch.Tensor], torch.Tensor], *, n_groups: int, heads_per_group: int,
                nope_dim: int, rope_dim: int, quant_group_size: int = 128,
                tma_aligned_scales: bool = False) -> torch.Tensor:
    """o [T, heads, head_dim] -> wo_b(wo_a_grouped(inverse_rope(o))) [T, hidden]."""
    from vllm.models.deepseek_v4.common.ops.fused_inv_rope_fp8_quant import fused_inv_rope_fp8_quant

    derotated, _ = fused_inv_rope_fp8_quant(
        o, positions, cos_sin_cache, n_groups=n_groups, heads_per_group=heads_per_group,
        nope_dim=nope_dim, rope_dim=rope_dim, quant_group_size=quant_group_size,
        tma_aligned_scales=tma_aligned_scales, quantize=False)  # [T, n_groups, heads_per_group * head_dim]
    z = wo_a.quant_method.apply_grouped(wo_a, derotated)  # [T, n_groups, o_lora_rank]
    return wo_b(z.flatten(1))

"""Torch versions of the two GEMM ops DeepSeek-V4's CPU attention calls for wo_a
(`_C::convert_weight_packed`, `_C::bmm_cpu`; vllm/models/deepseek_v4/cpu/cpu_sparse.py packs the
dequantized wo_a [groups, o_lora_rank, K] once and runs bmm_cpu(z, o, packed, is_vnni=True)).

The stock pair VNNI-packs the weight for AMX/AVX-512-BF16 tiles; only the stock bmm_cpu reads
that layout. Here packing is the identity (a contiguous copy, layout [B, N, K]) and bmm reads
[B, N, K] whatever is_vnni says. That is sound because the two are only ever registered together:
the AVX2 kernel library lacks both, the AVX-512 ones have both (vllm_ampere.cpu.ops registers
either none or both), so a stock-packed weight never reaches this bmm, nor ours the stock one.
The other stock consumers of convert_weight_packed (weight_packed_linear, fused_experts_cpu,
int8/fp8 scaled-mm, AMX MLA) run only where torch reports AMX tiles, i.e. on AVX-512 builds
that bring their own ops.
"""

from __future__ import annotations

import torch


def convert_weight_packed(weight: torch.Tensor) -> torch.Tensor:
    """The weight in the layout `bmm` reads: [..., N, K] unchanged (a contiguous copy)."""
    return weight.contiguous().clone()


def bmm(out: torch.Tensor, mat1: torch.Tensor, mat2: torch.Tensor, is_vnni: bool,
        scale: torch.Tensor | None) -> None:
    """out[b] = mat1[b] @ mat2[b].T with fp32 accumulation: mat1 [B, M, K], mat2 [B, N, K] (as
    `convert_weight_packed` leaves it; an FP8 mat2 is dequantized with its per-tensor `scale`),
    out [B, M, N] in its own dtype. `is_vnni` is accepted for the stock signature (see above)."""
    del is_vnni  # the same [B, N, K] layout either way (module docstring)
    if mat1.dim() != 3 or mat2.dim() != 3 or mat1.shape[0] != mat2.shape[0] or mat1.shape[2] != mat2.shape[2]:
        raise ValueError(f"bmm: mat1 {tuple(mat1.shape)} and mat2 {tuple(mat2.shape)} must be [B, M, K] and [B, N, K]")
    if out.shape != (mat1.shape[0], mat1.shape[1], mat2.shape[1]):
        raise ValueError(f"bmm: out {tuple(out.shape)} must be {(mat1.shape[0], mat1.shape[1], mat2.shape[1])}")
    w = mat2.to(torch.float32)
    if scale is not None:
        w = w * scale.to(torch.float32)
    out.copy_(torch.bmm(mat1.to(torch.float32), w.transpose(1, 2)))

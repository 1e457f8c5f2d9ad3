"""Reference of DeepSeek-V4's fused query-norm / RoPE / SWA-cache insert
(`_C::fused_qnorm_rope_kv_insert_cpu`; CUDA: `fused_deepseek_v4_qnorm_rope_kv_insert_kernel`).

- Q: per head, weight-free RMSNorm over head_dim in fp32, then GPT-J (interleaved-pair) RoPE on
  the last 64 dims; written into a zero-filled [T, q_head_padded, head_dim] tensor.
- KV: GPT-J RoPE on the last 64 dims (no norm), rounded to bf16, then inserted into the paged
  fp8_ds_mla cache at slot_mapping (negative slots skipped) by `sparse_mla.insert_fp8_ds_mla`.

The quantizer is the one our GPU kernels match (vLLM's CUDA/Triton insert: scale exponent
ceil(log2(max(amax, 1e-4) / 448)), e4m3 with subnormals). vLLM's AVX-512 CPU kernel
(csrc/cpu/sgl-kernels/store_cache.cpp) differs in two corners only: it floors the scale, not the
amax, at 1e-4 (so tiles with amax < 448e-4 get a larger exponent) and flushes values below e4m3's
smallest normal (2^-6 after scaling) to zero. Both decode to the same values within the fp8 step.
"""

from __future__ import annotations

import torch

from vllm_ampere.attention.reference.sparse_mla import HEAD_DIM, ROPE_DIM, insert_fp8_ds_mla
from vllm_ampere.attention.rope import gptj_rope


def qnorm_rope_kv_insert(q: torch.Tensor, kv: torch.Tensor, positions: torch.Tensor, cache_2d: torch.Tensor,
                         slot_mapping: torch.Tensor, cos_sin_cache: torch.Tensor, q_head_padded: int,
                         eps: float, cache_block_size: int) -> torch.Tensor:
    """q [T, H, 512], kv [>= n, 512] (bf16), positions [T] int64, cache_2d [blocks, bytes] uint8
    (written in place), slot_mapping [n] int64. Returns q_out [T, q_head_padded, 512]."""
    t, h, d = q.shape
    if d != HEAD_DIM or kv.shape[-1] != d or cos_sin_cache.shape[-1] != ROPE_DIM:
        raise ValueError(f"qnorm_rope_kv_insert: q {tuple(q.shape)}, kv {tuple(kv.shape)}, cos_sin_cache "
                         f"{tuple(cos_sin_cache.shape)}; head dim {HEAD_DIM} with {ROPE_DIM} RoPE dims expected")
    if q_head_padded < h:
        raise ValueError(f"q_head_padded {q_head_padded} < {h} query heads")
    qf = q.to(torch.float32)
    qf = qf * torch.rsqrt(qf.square().mean(-1, keepdim=True) + eps)
    q_out = torch.zeros(t, q_head_padded, d, dtype=q.dtype, device=q.device)
    q_out[:, :h] = gptj_rope(qf, positions, cos_sin_cache).to(q.dtype)
    n = slot_mapping.shape[0]
    slots = slot_mapping.to(torch.int64)
    keep = (slots >= 0).nonzero().squeeze(-1)
    if keep.numel():
        rows = gptj_rope(kv[:n][keep], positions[:n][keep], cos_sin_cache).to(torch.bfloat16)
        insert_fp8_ds_mla(cache_2d, cache_block_size, slots[keep], rows)
    return q_out

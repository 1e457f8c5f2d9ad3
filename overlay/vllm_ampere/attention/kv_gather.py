"""Prefill's gather of paged fp8_ds_mla KV rows into a BF16 workspace, for sm80/sm86.

Same contract as vLLM's `dequantize_and_gather_k_cache` (vllm/models/deepseek_v4/common/ops/
cache_utils.py), whose Triton kernel bitcasts to e4m3 (`tl.float8e4nv`, refused by Triton below
sm_89) and whose CuTe DSL variant targets Hopper+. For request r, positions
[seq_len - gather_len, seq_len) go to out[r, offset + i]; gather_lens None gathers seq_len rows.
Block-table entries are bounds-checked: a slot outside the cache leaves its row untouched.
"""

from __future__ import annotations

import torch

from vllm_ampere.attention.reference.sparse_mla import dequantize_fp8_ds_mla


def gather_paged_fp8_ds_mla(out: torch.Tensor, k_cache: torch.Tensor, seq_lens: torch.Tensor,
                            gather_lens: torch.Tensor | None, block_table: torch.Tensor,
                            block_size: int, offset: int) -> None:
    if k_cache.dtype != torch.uint8:
        raise TypeError(f"k_cache must be the uint8 fp8_ds_mla cache, got {k_cache.dtype}")
    num_slots = k_cache.shape[0] * block_size
    seq = seq_lens.to(torch.int64).tolist()
    gat = seq if gather_lens is None else gather_lens.to(torch.int64).tolist()
    for r, (s, g) in enumerate(zip(seq, gat)):  # per request: bounds the fp32 intermediate
        if g <= 0:
            continue
        if offset + g > out.shape[1]:
            raise ValueError(f"request {r}: {g} rows at offset {offset} overflow out {list(out.shape)}")
        pos = torch.arange(s - g, s, device=out.device)
        blocks = block_table[r].to(torch.int64)
        col = pos // block_size
        in_table = col < blocks.shape[0]
        slot = blocks[col.clamp(max=blocks.shape[0] - 1)] * block_size + pos % block_size
        valid = in_table & (slot >= 0) & (slot < num_slots)
        rows = dequantize_fp8_ds_mla(k_cache, block_size, slot, valid)
        dst = out[r, offset: offset + g]
        dst[valid] = rows[valid].to(out.dtype)

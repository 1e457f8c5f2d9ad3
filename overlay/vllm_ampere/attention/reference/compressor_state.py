"""Reference of DeepSeek-V4's compressor state write (`_C::save_partial_states_cpu`; the first
step of vLLM's compressor before `compress_norm_rope_store`, see
vllm_ampere.attention.compressor for the second).

Each token with a state slot writes one fp32 row [kv | score + ape[position % ratio]] of width
2 * state_width into the paged state cache (csrc/cpu/sgl-kernels/compressor.cpp,
`save_partial_states_impl`; the Triton path in vllm/models/deepseek_v4/compressor.py writes the
same row). The compress step later softmaxes the scores over a window of these rows.
"""

from __future__ import annotations

import torch


def save_partial_states(kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, positions: torch.Tensor,
                        state_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """kv, score [>= n, W] fp32 (row-strided views are fine); ape [ratio, W] fp32; positions [n]
    int64; state_cache [blocks, block_size, 2 W] fp32 (block stride may exceed the block's rows:
    the state cache shares the KV cache's pages); slot_mapping [n] int64, -1 skips a token."""
    n = slot_mapping.shape[0]
    width = kv.shape[-1]
    if state_cache.dim() != 3 or state_cache.shape[-1] != 2 * width or ape.shape[-1] != width:
        raise ValueError(f"save_partial_states: state_cache {tuple(state_cache.shape)}, kv {tuple(kv.shape)}, "
                         f"ape {tuple(ape.shape)}: rows must be [kv | score] of width 2 x {width}")
    slots = slot_mapping.to(torch.int64)
    keep = (slots >= 0).nonzero().squeeze(-1)
    if keep.numel() == 0:
        return
    block_size = state_cache.shape[1]
    blk, off = slots[keep] // block_size, slots[keep] % block_size
    ratio = ape.shape[0]
    pos = positions[:n].to(torch.int64)[keep]
    row = torch.cat((kv[:n][keep].to(torch.float32),
                     score[:n][keep].to(torch.float32) + ape.to(torch.float32)[pos % ratio]), -1)
    state_cache[blk, off] = row.to(state_cache.dtype)

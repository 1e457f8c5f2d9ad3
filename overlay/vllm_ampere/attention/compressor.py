"""DeepSeek-V4's KV compressor store step on sm80/sm86: compress -> RMSNorm -> RoPE -> FP8 ->
paged cache, in torch.

Stock CUDA runs it as a CuTe DSL kernel (head 512) or a Triton kernel that casts to
`tl.float8e4nv` (head 128, the indexer's keys); Triton refuses e4m3 below sm_89. The math is the
Triton kernels' (vllm/models/deepseek_v4/common/ops/fused_compress_quant_cache.py,
`_fused_kv_compress_norm_rope_insert_{sparse,indexer}_attn`), with the inputs of vLLM's CPU
port (`compress_norm_rope_store{,_indexer}_cpu`), which the tests compare against:

- for a token that closes a block ((pos + 1) % ratio == 0) and has a cache slot, its window of
  (1 + overlap) * ratio state rows (older block first; entries of the newest block read the
  second head_dim half of the state when overlap = 1) is reduced by a per-channel softmax of the
  scores over the window: c = sum_t softmax_t(score) * kv;
- RMSNorm in fp32 with the norm weight; GPT-J RoPE on the last rope dims at position
  (pos // ratio) * ratio;
- head 512 -> fp8_ds_mla: NoPE dims from bf16(normed, pre-RoPE) in e4m3 with one UE8M0 scale
  per 64, RoPE dims as bf16; head 128 -> indexer cache: bf16(roped) in e4m3 with one power-of-two
  fp32 scale per token (block layout: block_size x 128 values, then block_size x 4 scale bytes).
"""

from __future__ import annotations

import torch

from vllm_ampere.attention.reference.indexer_fp8 import indexer_cache_columns, indexer_cache_rows
from vllm_ampere.attention.reference.sparse_mla import insert_fp8_ds_mla
from vllm_ampere.attention.rope import gptj_rope


def _insert_indexer_fp8(kv_cache: torch.Tensor, block_size: int, slots: torch.Tensor, x: torch.Tensor) -> None:
    head = x.shape[-1]
    amax = x.abs().amax(-1).clamp_min(1e-4)
    exponent = torch.ceil(torch.log2(amax * (1.0 / 448.0)))
    values = (x * torch.exp2(-exponent).unsqueeze(-1)).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    rows = indexer_cache_rows(kv_cache, block_size, head)
    block = (slots // block_size).unsqueeze(-1)
    cols, scale_cols = indexer_cache_columns(slots % block_size, block_size, head)
    rows[block, cols] = values.view(torch.uint8)
    rows[block, scale_cols] = torch.exp2(exponent).to(torch.float32).unsqueeze(-1).view(torch.uint8)


def compress_norm_rope_store(state_cache: torch.Tensor, gather_slots: torch.Tensor, positions: torch.Tensor,
                             kv_slot_mapping: torch.Tensor, rms_norm_weight: torch.Tensor, rms_norm_eps: float,
                             cos_sin_cache: torch.Tensor, kv_cache: torch.Tensor, kv_cache_block_size: int,
                             compress_ratio: int) -> None:
    """Same arguments as vLLM's compress_norm_rope_store{,_indexer}_cpu (head dim from the norm
    weight): state_cache [blocks, block_size, 2 * state_width] fp32; gather_slots [T, window]
    global state slots (-1: before the sequence); kv_slot_mapping [T] compressed-cache slots."""
    head = rms_norm_weight.shape[0]
    window = gather_slots.shape[1]
    n = kv_slot_mapping.shape[0]
    positions = positions[:n].to(torch.int64)
    gather_slots = gather_slots[:n].to(torch.int64)
    kv_slots = kv_slot_mapping.to(torch.int64)
    sel = (((positions + 1) % compress_ratio == 0) & (kv_slots >= 0) & (gather_slots[:, -1] >= 0)).nonzero().squeeze(-1)
    if sel.numel() == 0:
        return
    slots = gather_slots[sel]  # [m, window]
    valid = slots >= 0
    safe = slots.clamp_min(0)
    bs = state_cache.shape[1]
    state_width = state_cache.shape[-1] // 2
    half = (torch.arange(window, device=slots.device) >= compress_ratio).to(torch.int64) * head
    cols = half.unsqueeze(-1) + torch.arange(head, device=slots.device)  # [window, head]
    blk, off = (safe // bs).unsqueeze(-1), (safe % bs).unsqueeze(-1)
    kv = state_cache[blk, off, cols].to(torch.float32).masked_fill(~valid.unsqueeze(-1), 0.0)
    score = state_cache[blk, off, cols + state_width].to(torch.float32)
    score = score.masked_fill(~valid.unsqueeze(-1), float("-inf"))
    c = (torch.softmax(score, dim=1) * kv).sum(1)  # [m, head]
    normed = c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + rms_norm_eps) * rms_norm_weight.to(torch.float32)
    rope_pos = (positions[sel] // compress_ratio) * compress_ratio
    roped = gptj_rope(normed, rope_pos, cos_sin_cache)
    dest = kv_slots[sel]
    if head == 512:
        rope_dim = cos_sin_cache.shape[-1]
        row = torch.cat((normed[:, :-rope_dim].to(torch.bfloat16), roped[:, -rope_dim:].to(torch.bfloat16)), -1)
        insert_fp8_ds_mla(kv_cache, kv_cache_block_size, dest, row)
    else:
        _insert_indexer_fp8(kv_cache, kv_cache_block_size, dest, roped.to(torch.bfloat16).to(torch.float32))

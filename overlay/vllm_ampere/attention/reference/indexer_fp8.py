"""References of DeepSeek-V4's FP8 lightning-indexer ops on CPU: the query quantizer
(`_C::fused_indexer_q_rope_quant_cpu`, CUDA/Triton: `_fused_indexer_q_rope_quant_kernel`), the
paged logits (`_C::fp8_paged_mqa_logits_cpu`, DeepGEMM's fp8_paged_mqa_logits on Hopper) and the
top-512 selection (`_C::topk_transform_512_cpu`).

Semantics (vLLM 0.32.0 csrc/cpu/sgl-kernels/{indexer,paged_mqa_logits,topk}.cpp):
- query: GPT-J RoPE on the last rope dims, rotated values rounded to bf16 (NoPE values are not);
  one power-of-two scale per (token, head) = 2^ceil(log2(max(1e-4, amax) / 448)); q / scale in
  e4m3; the scale is folded into the weights: w * scale * softmax_scale * head_scale;
- logits[b, n] = k_scale[n] * sum_h w[b, h] * relu(q[b, h] . k[n]) for n < seq_len[b] (the stock
  kernel leaves n >= seq_len unwritten; here they are -inf); keys are read from the paged
  indexer cache (per block: block_size x 128 e4m3 values, then block_size fp32 scales);
- top-512: rows with seq_len <= 512 take positions 0..seq_len-1 in order, then -1; longer rows
  take the 512 largest logits, ties to the lower position (order unspecified by the stock kernel;
  here by descending logit). Page indices are page_table[r // page_size] * page_size +
  r % page_size.
"""

from __future__ import annotations

import torch

from vllm_ampere.attention.rope import gptj_rope

FP8_MAX = 448.0
INDEX_HEAD_DIM = 128
SCALE_BYTES = 4
TOPK = 512


def indexer_cache_rows(cache: torch.Tensor, block_size: int, head_dim: int = INDEX_HEAD_DIM) -> torch.Tensor:
    """[pages, block_size * (head_dim + 4)] uint8 view of a paged FP8 indexer cache (page stride
    kept: the row stride may exceed a page)."""
    return cache.as_strided((cache.shape[0], block_size * (head_dim + SCALE_BYTES)), (cache.stride(0), 1))


def indexer_cache_columns(off: torch.Tensor, block_size: int, head_dim: int = INDEX_HEAD_DIM
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte columns, within a page row, of the e4m3 values [..., head_dim] and the fp32 scale's
    bytes [..., 4] of the tokens at in-page offsets `off` [...]."""
    off = off.unsqueeze(-1)
    values = off * head_dim + torch.arange(head_dim, device=off.device)
    scales = block_size * head_dim + off * SCALE_BYTES + torch.arange(SCALE_BYTES, device=off.device)
    return values, scales


def indexer_q_fp8(positions: torch.Tensor, index_q: torch.Tensor, cos_sin_cache: torch.Tensor,
                  weights: torch.Tensor, softmax_scale: float, head_scale: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """index_q [T, H, D] fp32, weights [T, H] -> (q e4m3 [T, H, D], weights fp32 [T, H])."""
    rope = cos_sin_cache.shape[-1]
    x = gptj_rope(index_q, positions, cos_sin_cache)
    x = torch.cat((x[..., :-rope], x[..., -rope:].to(torch.bfloat16).to(torch.float32)), -1)
    amax = x.abs().amax(-1).clamp_min(1e-4)
    scale = torch.exp2(torch.ceil(torch.log2(amax / FP8_MAX)))
    q = (x * (1.0 / scale).unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    w = weights.to(torch.float32) * scale * softmax_scale * head_scale
    return q, w


def paged_mqa_logits(q_fp8: torch.Tensor, kv_cache_2d: torch.Tensor, weights: torch.Tensor,
                     seq_lens: torch.Tensor, page_table: torch.Tensor, block_size: int, max_seq_len: int
                     ) -> torch.Tensor:
    """q_fp8 [B, H, 128] e4m3; kv_cache_2d [pages, bytes] uint8 (row stride may exceed a page);
    weights [B, H] fp32; seq_lens [B]; page_table [B, pages]. Returns logits [B, max_seq_len] fp32."""
    b, h, d = q_fp8.shape
    if d != INDEX_HEAD_DIM:
        raise ValueError(f"paged_mqa_logits: q head dim must be {INDEX_HEAD_DIM}, got {d}")
    if kv_cache_2d.shape[1] < block_size * (INDEX_HEAD_DIM + SCALE_BYTES):
        raise ValueError(f"paged_mqa_logits: cache page of {kv_cache_2d.shape[1]} bytes is too small for "
                         f"block_size {block_size}")
    out = torch.full((b, max_seq_len), float("-inf"), dtype=torch.float32, device=q_fp8.device)
    if b == 0 or max_seq_len == 0:
        return out
    rows = indexer_cache_rows(kv_cache_2d, block_size)
    pos = torch.arange(max_seq_len, device=q_fp8.device)
    lens = seq_lens.to(torch.int64).clamp(max=max_seq_len)
    for r in range(b):
        n = int(lens[r])
        if n <= 0:
            continue
        p = pos[:n]
        page = page_table[r, p // block_size].to(torch.int64).unsqueeze(-1)
        value_cols, scale_cols = indexer_cache_columns(p % block_size, block_size)
        k = rows[page, value_cols].view(torch.float8_e4m3fn)
        k_scale = rows[page, scale_cols].contiguous().view(torch.float32).squeeze(-1)
        # e4m3 values are exact in fp32; the dot products accumulate in fp32 as the stock kernel's.
        s = q_fp8[r].to(torch.float32) @ k.to(torch.float32).t()  # [H, n]
        out[r, :n] = (s.relu() * weights[r].to(torch.float32).unsqueeze(-1)).sum(0) * k_scale
    return out


def topk_transform_512(scores: torch.Tensor, seq_lens: torch.Tensor, page_tables: torch.Tensor,
                       out_page_indices: torch.Tensor, page_size: int,
                       out_raw_indices: torch.Tensor | None = None) -> None:
    """Write the top-512 positions per row (see the module docstring) into out_page_indices
    [B, >= 512] int32 and, if given, the raw positions into out_raw_indices."""
    if page_size <= 0 or page_size & (page_size - 1):
        raise ValueError(f"topk_transform_512: page_size must be a power of two, got {page_size}")
    b, width = scores.shape
    lens = seq_lens.to(torch.int64).clamp(0, width)
    raw = torch.full((b, TOPK), -1, dtype=torch.int64, device=scores.device)
    cols = torch.arange(TOPK, device=scores.device)
    short = lens <= TOPK
    raw[short] = torch.where(cols < lens[short].unsqueeze(-1), cols, -1)
    for r in (~short).nonzero().squeeze(-1).tolist():
        row = scores[r, : int(lens[r])]
        # Stable sort by descending logit keeps the lower position first among ties.
        raw[r] = torch.sort(row, descending=True, stable=True).indices[:TOPK]
    valid = raw >= 0
    safe = raw.clamp_min(0)
    phys = page_tables.to(torch.int64).gather(1, (safe // page_size).clamp(max=page_tables.shape[1] - 1))
    page_idx = torch.where(valid, phys * page_size + safe % page_size, -1)
    out_page_indices[:, :TOPK] = page_idx.to(out_page_indices.dtype)
    if out_raw_indices is not None:
        out_raw_indices[:, :TOPK] = raw.to(out_raw_indices.dtype)

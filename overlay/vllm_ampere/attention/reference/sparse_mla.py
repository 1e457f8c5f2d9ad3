"""Plain-torch (fp32 math) references of DeepSeek-V4's two sparse-MLA entry points.

They define the semantics our sm80 kernels (flashmla_ampere/) implement, and they are what the
CPU path and the Python face fall back to. The stock entry points they mirror:

- decode: `flash_mla_with_kvcache(q, k_cache, ..., is_fp8_kvcache=True, indices, topk_length,
  attn_sink, extra_k_cache, extra_indices_in_kvcache, extra_topk_length)` as called by
  vllm/models/deepseek_v4/nvidia/flashmla.py `_forward_decode`;
- prefill: `flash_mla_sparse_fwd(q, kv, indices, sm_scale, attn_sink, topk_length)` as called by
  `_forward_prefill`.

Semantics (FlashMLA's flash_mla_interface.py docstrings and tests/ref.py, vLLM 0.32.0 callers):
an index selects one KV row; it is invalid when negative, when it addresses a slot outside the
cache, or when its position in the list is >= the list's length; invalid entries contribute
nothing and are never read. K = V (the full 512-dim row). `lse` is the natural-log
log-sum-exp of the scaled scores; the per-head sink scales the output by
exp(lse) / (exp(lse) + exp(sink)) and leaves lse unchanged. A query with no valid entry gets a
zero output, lse = +inf (and max_logits = -inf in prefill). Duplicated indices count as often
as they appear.

fp8_ds_mla paged cache (vllm/models/deepseek_v4/common/ops/cache_utils.py,
`quantize_and_insert_k_kernel`): block b starts at byte b * cache.stride(0); token t of the
block keeps 448 e4m3 NoPE bytes + 64 bf16 RoPE values (576 B) at t * 576, and its 8 UE8M0
scale bytes (7 used, one per 64 NoPE dims; scale = 2^(byte - 127)) at block_size * 576 + t * 8.
All byte offsets are computed in int64: a 200k-token context passes 2^31 bytes.
"""

from __future__ import annotations

import math

import torch

HEAD_DIM = 512  # 448 NoPE + 64 RoPE
NOPE_DIM = 448
ROPE_DIM = 64
QUANT_BLOCK = 64  # NoPE dims per UE8M0 scale
TOKEN_DATA_BYTES = NOPE_DIM + 2 * ROPE_DIM  # 576
TOKEN_SCALE_BYTES = 8  # 7 scales + 1 pad
TOKEN_BYTES = TOKEN_DATA_BYTES + TOKEN_SCALE_BYTES  # 584
# Decode processes the concatenated index list in fixed chunks of this many entries; each chunk
# gives an fp32 partial (o, lse) and a combine merges them. The split plan depends only on the
# index arrays' widths, so a query's result never depends on what else is in the batch.
# flashmla_ampere/flashmla_config.h kSplitEntries must match.
DECODE_SPLIT_ENTRIES = 64
# Queries gathered at once; bounds the reference's [chunk, topk, 512] fp32 gather.
_QUERY_CHUNK = 64


def _cache_rows(cache: torch.Tensor, block_size: int) -> torch.Tensor:
    """[num_blocks, block_size * 584] uint8 view of a paged fp8_ds_mla cache (stride kept)."""
    if cache.dtype != torch.uint8:
        raise TypeError(f"fp8_ds_mla cache must be uint8, got {cache.dtype}")
    used = block_size * TOKEN_BYTES
    if cache.numel() and cache[0].numel() < used:
        raise ValueError(
            f"fp8_ds_mla cache block holds {cache[0].numel()} bytes; block_size={block_size} "
            f"needs {used} ({TOKEN_BYTES} per token)")
    if cache.dim() > 1 and cache.stride(-1) != 1:
        raise ValueError("fp8_ds_mla cache rows must be byte-contiguous")
    return cache.as_strided((cache.shape[0], used), (cache.stride(0), 1))


def fp8_ds_mla_byte_offsets(slots: torch.Tensor, block_size: int, block_stride: int
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 byte offsets (token data, scales) of each slot in a paged fp8_ds_mla cache."""
    slots = slots.to(torch.int64)
    block, pos = slots // block_size, slots % block_size
    base = block * block_stride
    return base + pos * TOKEN_DATA_BYTES, base + block_size * TOKEN_DATA_BYTES + pos * TOKEN_SCALE_BYTES


def _token_columns(pos: torch.Tensor, block_size: int, num_scales: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte columns, within a block row, of the token data [..., 576] and the first `num_scales`
    scale bytes [..., num_scales] of the tokens at in-block positions `pos` [...]."""
    pos = pos.unsqueeze(-1)
    data = pos * TOKEN_DATA_BYTES + torch.arange(TOKEN_DATA_BYTES, device=pos.device)
    scales = block_size * TOKEN_DATA_BYTES + pos * TOKEN_SCALE_BYTES + torch.arange(num_scales, device=pos.device)
    return data, scales


def slot_validity(slots: torch.Tensor, num_slots: int, lengths: torch.Tensor | None) -> torch.Tensor:
    """[..., n] bool: 0 <= slot < num_slots and position < length (lengths: [...] or None)."""
    valid = (slots >= 0) & (slots < num_slots)
    if lengths is not None:
        pos = torch.arange(slots.shape[-1], device=slots.device)
        valid &= pos < lengths.to(slots.device).unsqueeze(-1)
    return valid


def dequantize_fp8_ds_mla(cache: torch.Tensor, block_size: int, slots: torch.Tensor,
                          valid: torch.Tensor) -> torch.Tensor:
    """fp32 [..., 512] rows of the selected slots; rows where `valid` is False are zero and
    their slot is never read."""
    rows = _cache_rows(cache, block_size)
    flat_valid = valid.reshape(-1)
    safe = torch.where(flat_valid, slots.reshape(-1).to(torch.int64), 0)
    out = torch.zeros(safe.shape[0], HEAD_DIM, dtype=torch.float32, device=cache.device)
    idx = flat_valid.nonzero().squeeze(-1)
    if idx.numel():
        sel = safe[idx]
        block = (sel // block_size).unsqueeze(-1)
        data_cols, scale_cols = _token_columns(sel % block_size, block_size, NOPE_DIM // QUANT_BLOCK)
        data = rows[block, data_cols]  # [n, 576] uint8
        exps = rows[block, scale_cols].to(torch.float32)  # [n, 7]
        nope = data[:, :NOPE_DIM].contiguous().view(torch.float8_e4m3fn).to(torch.float32)
        nope = nope.view(-1, NOPE_DIM // QUANT_BLOCK, QUANT_BLOCK) * torch.exp2(exps - 127.0).unsqueeze(-1)
        rope = data[:, NOPE_DIM:].contiguous().view(torch.bfloat16).to(torch.float32)
        out[idx] = torch.cat([nope.reshape(-1, NOPE_DIM), rope], dim=-1)
    return out.view(*slots.shape, HEAD_DIM)


def quantize_fp8_ds_mla(kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 [n, 512] -> (576-byte token data, 8 scale bytes) per row, as vLLM's insert kernel
    writes them (UE8M0 scale = 2^ceil(log2(max(amax, 1e-4) / 448)), values clamped to +-448)."""
    x = kv.to(torch.float32)
    nope = x[:, :NOPE_DIM].view(-1, NOPE_DIM // QUANT_BLOCK, QUANT_BLOCK)
    amax = nope.abs().amax(-1).clamp_min(1e-4)
    exponent = torch.ceil(torch.log2(amax / 448.0))
    q = (nope / torch.exp2(exponent).unsqueeze(-1)).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    data = torch.cat([q.reshape(-1, NOPE_DIM).view(torch.uint8),
                      kv[:, NOPE_DIM:].to(torch.bfloat16).contiguous().view(torch.uint8)], dim=-1)
    scales = torch.zeros(kv.shape[0], TOKEN_SCALE_BYTES, dtype=torch.uint8, device=kv.device)
    scales[:, : NOPE_DIM // QUANT_BLOCK] = (exponent + 127).clamp(0, 255).to(torch.uint8)
    return data, scales


def insert_fp8_ds_mla(cache: torch.Tensor, block_size: int, slots: torch.Tensor, kv: torch.Tensor) -> None:
    """Quantize bf16 rows [n, 512] into the paged cache at `slots` (tests and benchmarks)."""
    data, scales = quantize_fp8_ds_mla(kv)
    rows = _cache_rows(cache, block_size)
    slots = slots.to(torch.int64)
    block = (slots // block_size).unsqueeze(-1)
    data_cols, scale_cols = _token_columns(slots % block_size, block_size, TOKEN_SCALE_BYTES)
    rows[block, data_cols] = data
    rows[block, scale_cols] = scales


def _num_slots(cache: torch.Tensor, block_size: int) -> int:
    return cache.shape[0] * block_size


def _partial(q: torch.Tensor, kv: torch.Tensor, valid: torch.Tensor, scale: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention of q [n, h, d] over kv [n, k, d] (valid [n, k]) -> (o normalized by its own
    sum [n, h, d], lse [n, h] (-inf when empty), max score [n, h])."""
    s = torch.einsum("nhd,nkd->nhk", q, kv) * scale
    s = s.masked_fill(~valid.unsqueeze(1), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(-1))
    o = torch.einsum("nhk,nkd->nhd", p, kv)
    return o, lse, s.amax(dim=-1) if s.shape[-1] else lse.clone()


def _finish(o: torch.Tensor, lse: torch.Tensor, attn_sink: torch.Tensor | None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the sink and the empty-query convention: (o, lse) -> (o, lse with +inf)."""
    empty = torch.isneginf(lse)
    if attn_sink is not None:
        sink = attn_sink.to(torch.float32).to(o.device)
        # exp(lse) / (exp(lse) + exp(sink)) = sigmoid(lse - sink); sink = -inf leaves o as is.
        o = o * torch.sigmoid(lse - sink).unsqueeze(-1)
    o = o.masked_fill(empty.unsqueeze(-1), 0.0)
    return o, lse.masked_fill(empty, float("inf"))


def combine_splits(o_parts: torch.Tensor, lse_parts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge per-split partials o [n, S, h, d] / lse [n, S, h] into (o [n, h, d], lse [n, h])."""
    lse = torch.logsumexp(lse_parts, dim=1)
    w = torch.exp(lse_parts - torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(1))
    w = torch.where(torch.isneginf(lse_parts), 0.0, w)  # an empty split has no (finite) o
    o = (w.unsqueeze(-1) * torch.where(torch.isneginf(lse_parts).unsqueeze(-1), 0.0, o_parts)).sum(1)
    return o, lse


def decode_num_splits(topk: int, extra_topk: int) -> int:
    return max(1, math.ceil((topk + extra_topk) / DECODE_SPLIT_ENTRIES))


def flash_mla_sparse_decode_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    indices: torch.Tensor,
    topk_length: torch.Tensor | None = None,
    attn_sink: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    extra_k_cache: torch.Tensor | None = None,
    extra_indices: torch.Tensor | None = None,
    extra_topk_length: torch.Tensor | None = None,
    *,
    block_size: int | None = None,
    extra_block_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse decode over one or two fp8_ds_mla paged caches.

    q: [b, s_q, h, 512] bf16. k_cache: [num_blocks, block_size, (1,) 584] uint8 (or 2-D
    [num_blocks, bytes] with `block_size` given). indices: [b, s_q, topk] int32 global slots
    (block * block_size + offset). topk_length: [b] int32 or None. attn_sink: [h] fp32 or None.
    extra_*: the second stream (compressed top-k), same formats.
    Returns out [b, s_q, h, 512] bf16 and lse [b, h, s_q] fp32.
    """
    b, s_q, h, d = q.shape
    if d != HEAD_DIM:
        raise ValueError(f"q head dim must be {HEAD_DIM}, got {d}")
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    streams = [(k_cache, block_size or k_cache.shape[1], indices, topk_length)]
    if extra_k_cache is not None:
        if extra_indices is None:
            raise ValueError("extra_k_cache needs extra_indices")
        streams.append((extra_k_cache, extra_block_size or extra_k_cache.shape[1],
                        extra_indices, extra_topk_length))
    n = b * s_q
    qf = q.reshape(n, h, d).to(torch.float32)
    # One concatenated list per query: the first stream, then the second.
    kv_parts = []
    for cache, bs, idx, lens in streams:
        idx = idx.reshape(b, s_q, -1)
        valid = slot_validity(idx, _num_slots(cache, bs), None if lens is None else lens.view(b, 1))
        kv_parts.append((cache, bs, idx.reshape(n, -1), valid.reshape(n, -1)))
    total = sum(p[2].shape[-1] for p in kv_parts)
    num_splits = decode_num_splits(total, 0)
    o = torch.empty(n, h, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(n, h, dtype=torch.float32, device=q.device)
    for start in range(0, n, _QUERY_CHUNK):
        rows = slice(start, min(n, start + _QUERY_CHUNK))
        kv = torch.cat([dequantize_fp8_ds_mla(c, bs, i[rows], v[rows]) for c, bs, i, v in kv_parts], 1)
        valid = torch.cat([v[rows] for *_, v in kv_parts], 1)
        o_parts, lse_parts = [], []
        for s in range(num_splits):
            cols = slice(s * DECODE_SPLIT_ENTRIES, (s + 1) * DECODE_SPLIT_ENTRIES)
            o_s, lse_s, _ = _partial(qf[rows], kv[:, cols], valid[:, cols], scale)
            o_parts.append(o_s)
            lse_parts.append(lse_s)
        o[rows], lse[rows] = combine_splits(torch.stack(o_parts, 1), torch.stack(lse_parts, 1))
    o, lse = _finish(o, lse, attn_sink)
    return o.view(b, s_q, h, d).to(torch.bfloat16), lse.view(b, s_q, h).transpose(1, 2).contiguous()


def flash_mla_sparse_prefill_ref(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    attn_sink: torch.Tensor | None = None,
    topk_length: torch.Tensor | None = None,
    d_v: int = HEAD_DIM,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse prefill over gathered BF16 KV.

    q: [s_q, h, 512] bf16; kv: [s_kv, (1,) 512] bf16; indices: [s_q, (1,) topk] int32 rows of kv;
    topk_length: [s_q] int32 or None; attn_sink: [h] fp32 or None.
    Returns out [s_q, h, d_v] bf16, max_logits [s_q, h] fp32 (-inf when empty), lse [s_q, h] fp32.
    """
    if d_v != HEAD_DIM:
        raise ValueError(f"d_v must be {HEAD_DIM} (K = V), got {d_v}")
    s_q, h, d = q.shape
    kv2 = kv.reshape(kv.shape[0], -1)
    idx = indices.reshape(s_q, -1)
    valid = slot_validity(idx, kv2.shape[0], topk_length)
    o = torch.empty(s_q, h, d_v, dtype=torch.float32, device=q.device)
    lse = torch.empty(s_q, h, dtype=torch.float32, device=q.device)
    mx = torch.empty(s_q, h, dtype=torch.float32, device=q.device)
    for start in range(0, s_q, _QUERY_CHUNK):
        rows = slice(start, min(s_q, start + _QUERY_CHUNK))
        v = valid[rows]
        safe = torch.where(v, idx[rows].to(torch.int64), 0)
        gathered = kv2[safe].to(torch.float32).masked_fill(~v.unsqueeze(-1), 0.0)
        o[rows], lse[rows], mx[rows] = _partial(q[rows].to(torch.float32), gathered, v, sm_scale)
    o, lse_out = _finish(o, lse, attn_sink)
    return o.to(torch.bfloat16), mx, lse_out

"""DeepSeek-V4's lightning indexer on sm80/sm86: no DeepGEMM, no FP8 arithmetic.

Stock CUDA scores every compressed token with DeepGEMM's fp8_mqa_logits /
fp8_paged_mqa_logits (Hopper/Blackwell) on an FP8 query made by a Triton kernel that stores
e4m3 (refused by Triton below sm_89). Here:

- the query stays BF16 after the same GPT-J RoPE (`indexer_q_bf16`), its weights folded with
  softmax_scale * head_scale (no q scale: nothing was quantized);
- the keys are read from the stock FP8 indexer cache (per block: block_size x 128 e4m3 values,
  then block_size fp32 scales; vLLM's V3.2 layout) as exact BF16 values plus a per-row scale;
- logits[m, n] = sum_h w[m, h] * relu(q[m, h] . k[n] * k_scale[n]) (DeepGEMM's definition,
  as vLLM's fp8_paged_mqa_logits_cpu computes it) in BF16 matmuls through torch, in row chunks
  and column chunks, so a 200k-token prompt never holds an [M, N] fp32 buffer;
- with the IMMA flag, queries and keys are INT8 (per-head / per-row absmax scales) and the
  dot products s8 x s8 -> s32 (torch._int_mm on CUDA);
- top-k keeps the largest logits with ties broken toward the lower position, so the choice is
  deterministic; rows with fewer candidates than k are padded with -1.
Output indices are local compressed positions, as the stock indexer writes them.
"""

from __future__ import annotations

import torch

from vllm_ampere.attention.reference.indexer_fp8 import indexer_cache_columns, indexer_cache_rows
from vllm_ampere.attention.rope import gptj_rotate

# Elements of the [rows * heads, cols] score block a chunk may hold (BF16: 2 bytes each).
SCORE_BLOCK_ELEMS = 32 * 1024 * 1024
# fp32 logits a row chunk may hold before its top-k.
LOGIT_CHUNK_ELEMS = 16 * 1024 * 1024


def indexer_q_bf16(positions: torch.Tensor, index_q: torch.Tensor, cos_sin_cache: torch.Tensor,
                   weights: torch.Tensor, softmax_scale: float, head_scale: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """GPT-J RoPE on the last rope dims of each head (rounded to BF16, as the stock kernel
    rounds before quantizing) -> (q [T, H, D] bf16, weights * softmax_scale * head_scale fp32)."""
    nope = index_q.shape[-1] - cos_sin_cache.shape[-1]
    rotated = gptj_rotate(index_q[..., nope:], positions, cos_sin_cache)
    q = torch.cat((index_q[..., :nope].to(torch.bfloat16), rotated.to(torch.bfloat16)), -1)
    return q, weights.to(torch.float32) * (softmax_scale * head_scale)


def gather_keys(kv_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flatten the requests' compressed keys: (values [N, 128] bf16, scales [N] fp32,
    cu_seq_lens [R + 1] int64). Slots outside the cache give a zero row and scale."""
    num_blocks, block_size = kv_cache.shape[0], kv_cache.shape[1]
    rows = indexer_cache_rows(kv_cache, block_size)
    device = kv_cache.device
    lens = seq_lens.to(torch.int64).to(device)
    cu = torch.zeros(lens.shape[0] + 1, dtype=torch.int64, device=device)
    cu[1:] = torch.cumsum(lens, 0)
    total = int(cu[-1])
    req = torch.repeat_interleave(torch.arange(lens.shape[0], device=device), lens)
    pos = torch.arange(total, device=device) - cu[req]
    col = pos // block_size
    table = block_table.to(torch.int64).to(device)
    blk = table[req, col.clamp(max=table.shape[1] - 1)]
    valid = (col < table.shape[1]) & (blk >= 0) & (blk < num_blocks)
    blk = torch.where(valid, blk, 0)
    val_cols, sc_cols = indexer_cache_columns(pos % block_size, block_size)
    values = rows[blk.unsqueeze(-1), val_cols].view(torch.float8_e4m3fn).to(torch.bfloat16)
    scales = rows[blk.unsqueeze(-1), sc_cols].contiguous().view(torch.float32).squeeze(-1)
    values = torch.where(valid.unsqueeze(-1), values, 0)
    return values, torch.where(valid, scales, 0.0), cu


def _quantize_int8(x: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax INT8 along `dim`: (q int8, scale fp32) with x ~= q * scale."""
    scale = x.abs().amax(dim, keepdim=True).to(torch.float32).clamp_min(1e-20) / 127.0
    return torch.round(x.to(torch.float32) / scale).clamp(-127, 127).to(torch.int8), scale


def _int8_scores(q8: torch.Tensor, k8: torch.Tensor) -> torch.Tensor:
    """[a, D] s8 x [b, D] s8 -> [a, b] s32-exact scores (as fp32)."""
    if q8.is_cuda and q8.shape[0] > 16:
        pad = (-k8.shape[0]) % 8  # torch._int_mm wants N % 8 == 0
        k8p = torch.nn.functional.pad(k8, (0, 0, 0, pad)) if pad else k8
        return torch._int_mm(q8, k8p.t())[:, : k8.shape[0]].to(torch.float32)
    # |sum| <= 128 * 127 * 127 < 2^24: an fp32 matmul of the integer values is exact.
    return q8.to(torch.float32) @ k8.to(torch.float32).t()


def indexer_logits(q: torch.Tensor, weights: torch.Tensor, k_values: torch.Tensor,
                   k_scales: torch.Tensor, *, imma: bool = False) -> torch.Tensor:
    """logits [m, n] = sum_h weights[m, h] * relu(q[m, h] . k[n] * k_scale[n]); column-chunked."""
    m, h, d = q.shape
    n = k_values.shape[0]
    out = torch.empty(m, n, dtype=torch.float32, device=q.device)
    cols = max(8, SCORE_BLOCK_ELEMS // max(1, m * h))
    w = weights.to(torch.float32).unsqueeze(-1)  # [m, h, 1]
    if imma:
        q8, q_scale = _quantize_int8(q.reshape(m * h, d))
        q_scale = q_scale.view(m, h, 1)
    else:
        qb = q.reshape(m * h, d).to(torch.bfloat16)
    for c0 in range(0, n, cols):
        kv = k_values[c0: c0 + cols]
        ks = k_scales[c0: c0 + cols].to(torch.float32)
        if imma:
            k8, k_row = _quantize_int8(kv)
            s = _int8_scores(q8, k8).view(m, h, -1) * q_scale * (k_row.view(1, 1, -1) * ks)
        else:
            s = (qb @ kv.to(torch.bfloat16).t()).view(m, h, -1).to(torch.float32) * ks
        out[:, c0: c0 + cols] = (s.relu_() * w).sum(1)
    return out


def deterministic_topk(logits: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """Column indices of each row's k largest valid logits, ties to the lower column, in
    ascending column order; -1 where a row has fewer than k valid columns."""
    m, n = logits.shape
    out = torch.full((m, k), -1, dtype=torch.int32, device=logits.device)
    if n == 0 or m == 0:
        return out
    x = logits.masked_fill(~valid, float("-inf"))
    kk = min(k, n)
    thr = torch.topk(x, kk, dim=1).values[:, -1:]
    greater = (x > thr) & valid
    tied = (x == thr) & valid
    need = kk - greater.sum(1, keepdim=True)
    take = greater | (tied & (torch.cumsum(tied.to(torch.int32), 1) <= need))
    cols = torch.arange(n, device=logits.device).expand(m, n)
    key = torch.where(take, cols, n)
    picked = torch.topk(key, kk, dim=1, largest=False, sorted=True).values
    out[:, :kk] = torch.where(picked < n, picked, -1).to(torch.int32)
    return out


def topk_over_ranges(q: torch.Tensor, weights: torch.Tensor, k_values: torch.Tensor, k_scales: torch.Tensor,
                     row_starts: torch.Tensor, row_ends: torch.Tensor, topk: int, out: torch.Tensor,
                     *, imma: bool = False) -> None:
    """For each query row r, top-k over keys [row_starts[r], row_ends[r]) of the flat key
    array; writes local positions (index - row_start) into out [M, topk] (-1 padded).
    Rows are processed in chunks so the fp32 logits of a chunk stay under LOGIT_CHUNK_ELEMS."""
    m = q.shape[0]
    if m == 0:
        return
    starts = row_starts.to(torch.int64).cpu()
    ends = row_ends.to(torch.int64).cpu()
    r0 = 0
    while r0 < m:
        c0, c1 = int(starts[r0]), int(ends[r0])
        r1 = r0 + 1
        while r1 < m and (max(c1, int(ends[r1])) - min(c0, int(starts[r1]))) * (r1 + 1 - r0) <= LOGIT_CHUNK_ELEMS:
            c0, c1 = min(c0, int(starts[r1])), max(c1, int(ends[r1]))
            r1 += 1
        c1 = max(c1, c0)
        logits = indexer_logits(q[r0:r1], weights[r0:r1], k_values[c0:c1], k_scales[c0:c1], imma=imma)
        cols = torch.arange(c0, c1, device=q.device)
        rs = row_starts[r0:r1].to(torch.int64).to(q.device).unsqueeze(-1)
        re = row_ends[r0:r1].to(torch.int64).to(q.device).unsqueeze(-1)
        idx = deterministic_topk(logits, (cols >= rs) & (cols < re), topk)
        local = torch.where(idx >= 0, idx.to(torch.int64) + c0 - rs, -1)
        out[r0:r1, :topk] = local.to(out.dtype)
        r0 = r1

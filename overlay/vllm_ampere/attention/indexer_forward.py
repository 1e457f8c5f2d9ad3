"""SparseAttnIndexer's forward on sm80/sm86: the stock metadata walk, our torch scoring.

Mirrors vLLM 0.32.0's `SparseAttnIndexer.forward_cpu` / `sparse_attn_indexer`
(vllm/model_executor/layers/sparse_attn_indexer.py): prefill rows score the keys of their
chunk's requests in [cu_seqlen_ks, cu_seqlen_ke); decode rows score their request's whole
compressed context. The scoring and top-k are vllm_ampere.attention.indexer.
"""

from __future__ import annotations

import torch
from vllm.forward_context import get_forward_context

from vllm_ampere.attention.indexer import gather_keys, topk_over_ranges


def sparse_attn_indexer_sm8x(op, hidden_states: torch.Tensor, q: torch.Tensor, weights: torch.Tensor,
                             imma: bool) -> torch.Tensor:
    if op.use_fp4_cache:
        raise NotImplementedError("the MXFP4 indexer cache is Blackwell-only; sm8x uses the FP8 one")
    if not op.skip_k_cache_insert or op.dcp_world_size > 1 or op.use_pcp or op.candidate_blocks is not None:
        raise NotImplementedError(
            "vllm_ampere's sm8x indexer supports DeepSeek-V4's compressor-written cache without "
            "context parallelism or DeepSeek-V4.1 candidate blocks")
    attn_metadata = get_forward_context().attn_metadata
    buf = op.topk_indices_buffer
    if not isinstance(attn_metadata, dict):  # profiling / dummy run
        return buf
    md = attn_metadata[op.k_cache.prefix]
    kv_cache = op.k_cache.kv_cache
    topk = op.topk_tokens
    buf[: hidden_states.shape[0]] = -1
    if md.num_prefills > 0:
        keys = None
        for chunk in md.prefill.chunks:
            if keys is None or not chunk.skip_kv_gather:
                lens = chunk.local_cu_seq_lens.diff()
                keys = gather_keys(kv_cache, chunk.block_table[: lens.shape[0]], lens)
            rows = slice(chunk.token_start, chunk.token_end)
            topk_over_ranges(q[rows], weights[rows], keys[0], keys[1], chunk.cu_seqlen_ks,
                             chunk.cu_seqlen_ke, topk, buf[rows], imma=imma)
    if md.num_decodes > 0:
        dm = md.decode
        batch = dm.decode_lens.shape[0]
        if dm.requires_padding or md.num_decode_tokens != batch:
            raise NotImplementedError(
                "vllm_ampere's sm8x indexer scores one decode row per request, but the metadata "
                "builder gave native multi-row (MTP) decode metadata: is the patch "
                "indexer_native_decode_sm8x installed?")
        seq_lens = dm.seq_lens[:, -1] if dm.seq_lens.ndim == 2 else dm.seq_lens
        values, scales, cu = gather_keys(kv_cache, dm.block_table[:batch], seq_lens[:batch])
        topk_over_ranges(q[:batch], weights[:batch], values, scales, cu[:-1], cu[1:], topk,
                         buf[:batch], imma=imma)
    return buf

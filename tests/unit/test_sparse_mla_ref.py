"""The sparse-MLA references against a direct dense-attention computation (float64, per query).

The direct computation builds each query's list of valid KV rows by hand (Python loop, no
masking tricks), so the references' masking, split/combine, sink and empty-query conventions
are checked against first principles.
"""

import math
import os

import pytest
import torch

from vllm_ampere.attention.reference import sparse_mla as ref

H, D = 64, 512  # DeepSeek-V4-Flash: 64 heads (padded), head dim 512


def _direct(q, rows_per_query, scale, sink):
    """q [n, h, d]; rows_per_query: list of [k_i, d] float64 -> (o [n, h, d], lse [n, h])."""
    outs, lses = [], []
    for qi, rows in zip(q.double(), rows_per_query):
        if rows.shape[0] == 0:
            outs.append(torch.zeros(q.shape[1], q.shape[2], dtype=torch.float64))
            lses.append(torch.full((q.shape[1],), math.inf, dtype=torch.float64))
            continue
        s = (qi @ rows.T) * scale
        lse = torch.logsumexp(s, -1)
        o = torch.softmax(s, -1) @ rows
        if sink is not None:
            o = o * (torch.exp(lse) / (torch.exp(lse) + torch.exp(sink.double()))).unsqueeze(-1)
        outs.append(o)
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


def _paged_cache(num_blocks, block_size, gen, pad_bytes=576, with_kv=False):
    """A random fp8_ds_mla cache with padded block stride, plus the dequantized rows per slot
    (and the bf16 rows stored, with_kv)."""
    stride = block_size * ref.TOKEN_BYTES + pad_bytes
    storage = torch.zeros(num_blocks * stride, dtype=torch.uint8)
    cache = storage.as_strided((num_blocks, block_size, ref.TOKEN_BYTES), (stride, ref.TOKEN_DATA_BYTES, 1))
    kv = (torch.randn(num_blocks * block_size, D, generator=gen) * 2).to(torch.bfloat16)
    slots = torch.arange(num_blocks * block_size)
    ref.insert_fp8_ds_mla(cache, block_size, slots, kv)
    deq = ref.dequantize_fp8_ds_mla(cache, block_size, slots, torch.ones_like(slots, dtype=torch.bool))
    return (cache, deq.double(), kv) if with_kv else (cache, deq.double())


def _rows(deq, idx, length, num_slots):
    picked = [deq[i] for j, i in enumerate(idx.tolist()) if 0 <= i < num_slots and j < length]
    return torch.stack(picked) if picked else deq[:0]


def _check(o, lse, o_direct, lse_direct):
    fin = torch.isfinite(lse_direct)
    assert torch.equal(torch.isinf(lse), ~fin), "empty-query positions differ"
    torch.testing.assert_close(lse[fin].double(), lse_direct[fin], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(o.double(), o_direct, atol=2e-2, rtol=1e-2)


def test_quantization_round_trip_is_vllms_format():
    gen = torch.Generator().manual_seed(0)
    kv = (torch.randn(8, D, generator=gen) * 3).to(torch.bfloat16)
    data, scales = ref.quantize_fp8_ds_mla(kv)
    assert data.shape == (8, 576) and scales.shape == (8, 8)
    assert (scales[:, 7] == 0).all()  # padding scale byte
    assert torch.equal(data[:, 448:].contiguous().view(torch.bfloat16), kv[:, 448:])  # RoPE kept
    cache, deq, kv = _paged_cache(2, 4, gen, with_kv=True)
    # NoPE: e4m3 (3 mantissa bits) under one power-of-two scale per 64 values that keeps the
    # block's amax within 448: every value is off by at most half an e4m3 step at the amax.
    nope, stored = deq[:, :448].view(8, 7, 64), kv[:, :448].double().view(8, 7, 64)
    bound = stored.abs().amax(-1, keepdim=True) * 2.0**-4
    assert ((nope - stored).abs() <= bound).all()
    assert (nope != stored).any()  # and it is quantized, not kept
    assert torch.equal(deq[:, 448:], kv[:, 448:].double())  # RoPE dims exact
    back = ref.dequantize_fp8_ds_mla(cache, 4, torch.arange(8), torch.ones(8, dtype=torch.bool))
    assert torch.equal(back.to(torch.bfloat16).float(), back), "dequantized rows must be exact in bf16"


@pytest.mark.parametrize("sink", [None, "zero", "random"])
def test_decode_two_streams_matches_direct(sink):
    gen = torch.Generator().manual_seed(1)
    b, bs_w, bs_c = 3, 64, 2
    win_cache, win_deq = _paged_cache(4, bs_w, gen)
    cmp_cache, cmp_deq = _paged_cache(40, bs_c, gen)
    q = torch.randn(b, 1, H, D, generator=gen).to(torch.bfloat16)
    win = torch.randint(-1, 4 * bs_w, (b, 1, 128), generator=gen, dtype=torch.int32)
    cmp = torch.randint(0, 80, (b, 1, 200), generator=gen, dtype=torch.int32)
    cmp[0, 0, :5] = cmp[0, 0, 5]  # duplicated indices count each time
    cmp[1, 0, 7] = 10_000  # out of range: contributes nothing
    cmp[2, 0, 3] = -7
    win_len = torch.tensor([128, 50, 0], dtype=torch.int32)  # lengths shorter than the arrays
    cmp_len = torch.tensor([200, 199, 64], dtype=torch.int32)
    sink_t = {None: None, "zero": torch.zeros(H),
              "random": torch.randn(H, generator=gen)}[sink]
    scale = D ** -0.5
    o, lse = ref.flash_mla_sparse_decode_ref(q, win_cache, win, win_len, sink_t, scale,
                                             cmp_cache, cmp, cmp_len)
    assert o.shape == (b, 1, H, D) and o.dtype == torch.bfloat16 and lse.shape == (b, H, 1)
    rows = [torch.cat([_rows(win_deq, win[i, 0], int(win_len[i]), 4 * bs_w),
                       _rows(cmp_deq, cmp[i, 0], int(cmp_len[i]), 80)]) for i in range(b)]
    o_d, lse_d = _direct(q.view(b, H, D).float(), rows, scale, sink_t)
    _check(o.view(b, H, D).float(), lse.view(b, H), o_d, lse_d)


def test_decode_empty_and_all_invalid_lists():
    gen = torch.Generator().manual_seed(2)
    cache, _ = _paged_cache(2, 64, gen)
    q = torch.randn(3, 1, H, D, generator=gen).to(torch.bfloat16)
    idx = torch.full((3, 1, 64), -1, dtype=torch.int32)
    idx[1] = 1 << 20  # all out of range
    idx[2, 0, 0] = 5  # valid but cut off by length 0
    lens = torch.tensor([64, 64, 0], dtype=torch.int32)
    o, lse = ref.flash_mla_sparse_decode_ref(q, cache, idx, lens, torch.randn(H, generator=gen))
    assert (o == 0).all() and torch.isposinf(lse).all()
    # A zero-width index array (an empty list) is the same.
    o, lse = ref.flash_mla_sparse_decode_ref(q, cache, idx[..., :0], None, None)
    assert (o == 0).all() and torch.isposinf(lse).all()


def test_decode_split_count_is_fixed_by_shapes():
    assert ref.decode_num_splits(128, 512) == 10
    assert ref.decode_num_splits(0, 0) == 1
    # Same query, alone or with other queries: bit-identical results.
    gen = torch.Generator().manual_seed(3)
    cache, _ = _paged_cache(8, 64, gen)
    q = torch.randn(4, 1, H, D, generator=gen).to(torch.bfloat16)
    idx = torch.randint(0, 512, (4, 1, 640), generator=gen, dtype=torch.int32)
    o_all, lse_all = ref.flash_mla_sparse_decode_ref(q, cache, idx)
    o_one, lse_one = ref.flash_mla_sparse_decode_ref(q[2:3], cache, idx[2:3])
    assert torch.equal(o_all[2:3], o_one) and torch.equal(lse_all[2:3], lse_one)


def test_decode_offsets_past_2_pow_31_bytes(tmp_path):
    """A cache larger than 2^31 bytes, as a sparse memory-mapped file: only the touched pages
    exist, so the test reads slots at > 2 GiB offsets without allocating 2 GiB."""
    block_size, stride = 64, 64 * ref.TOKEN_BYTES + 512  # 37,888 B per block
    num_blocks = (1 << 31) // stride + 100
    path = tmp_path / "cache.bin"
    with open(path, "wb") as f:
        f.truncate(num_blocks * stride)
    storage = torch.from_file(str(path), shared=True, size=num_blocks * stride, dtype=torch.uint8)
    cache = storage.as_strided((num_blocks, block_size, ref.TOKEN_BYTES), (stride, ref.TOKEN_DATA_BYTES, 1))
    gen = torch.Generator().manual_seed(4)
    last = num_blocks * block_size - 1
    slots = torch.tensor([last, last - 70, 5], dtype=torch.int64)
    data_off, _ = ref.fp8_ds_mla_byte_offsets(slots, block_size, stride)
    assert data_off[0] > 2 ** 31 and data_off.dtype == torch.int64
    kv = (torch.randn(3, D, generator=gen)).to(torch.bfloat16)
    ref.insert_fp8_ds_mla(cache, block_size, slots, kv)
    deq = ref.dequantize_fp8_ds_mla(cache, block_size, slots, torch.ones(3, dtype=torch.bool)).double()
    q = torch.randn(1, 1, H, D, generator=gen).to(torch.bfloat16)
    idx = torch.tensor([[[last, last - 70, 5, last + 1]]], dtype=torch.int32)  # last+1: out of range
    o, lse = ref.flash_mla_sparse_decode_ref(q, cache, idx, None, None, 0.05)
    o_d, lse_d = _direct(q.view(1, H, D).float(), [deq], 0.05, None)
    _check(o.view(1, H, D).float(), lse.view(1, H), o_d, lse_d)
    del storage, cache
    os.remove(path)


@pytest.mark.parametrize("with_lengths", [False, True])
def test_prefill_matches_direct(with_lengths):
    gen = torch.Generator().manual_seed(5)
    s_q, s_kv, topk = 9, 300, 256
    q = torch.randn(s_q, H, D, generator=gen).to(torch.bfloat16)
    kv = torch.randn(s_kv, 1, D, generator=gen).to(torch.bfloat16)
    idx = torch.randint(-2, s_kv + 3, (s_q, 1, topk), generator=gen, dtype=torch.int32)
    idx[0, 0, :10] = 17  # duplicates
    idx[1] = -1  # all invalid
    idx[2, 0, :] = s_kv  # all out of range
    lens = torch.randint(0, topk + 1, (s_q,), generator=gen, dtype=torch.int32) if with_lengths else None
    if with_lengths:
        lens[3] = 0
    sink = torch.randn(H, generator=gen)
    sink[:8] = 0.0
    sink[8:16] = -math.inf  # no sink effect
    scale = D ** -0.5
    o, mx, lse = ref.flash_mla_sparse_prefill_ref(q, kv, idx, scale, sink, lens)
    kvd = kv.view(s_kv, D).double()
    rows = [_rows(kvd, idx[i, 0], topk if lens is None else int(lens[i]), s_kv) for i in range(s_q)]
    o_d, lse_d = _direct(q.float(), rows, scale, sink)
    _check(o.float(), lse, o_d, lse_d)
    for i, r in enumerate(rows):
        if r.shape[0]:
            torch.testing.assert_close(mx[i].double(), ((q[i].double() @ r.T) * scale).amax(-1), atol=1e-4, rtol=1e-5)
        else:
            assert torch.isneginf(mx[i]).all()


def test_prefill_rejects_wrong_dv():
    q = torch.zeros(1, H, D, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="d_v"):
        ref.flash_mla_sparse_prefill_ref(q, q[:, 0], torch.zeros(1, 1, 1, dtype=torch.int32), 1.0, d_v=448)

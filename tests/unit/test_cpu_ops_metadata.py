"""The torch versions of the DeepSeek-V4 metadata Triton kernels against per-token Python loops
written from the kernels' source (vLLM 0.32.0), on ragged batches with decodes and prefills."""

from __future__ import annotations

import torch

from vllm_ampere.cpu import metadata_kernels as mk

BLOCK = 64


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    q_lens = [1, 1, 5, 37, 130]  # two decodes, three prefills
    ctx = [int(torch.randint(0, 300, (1,), generator=g)) for _ in q_lens]
    seq_lens = torch.tensor([c + q for c, q in zip(ctx, q_lens)], dtype=torch.int32)
    qsl = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)
    blocks = (int(seq_lens.max()) + BLOCK - 1) // BLOCK + 1
    block_table = torch.randperm(len(q_lens) * blocks, generator=g).view(len(q_lens), blocks).to(torch.int32)
    return q_lens, seq_lens, qsl, block_table


def _owner(qsl, t):
    return next(r for r in range(len(qsl) - 1) if qsl[r] <= t < qsl[r + 1])


def test_token_request_mapping():
    _, _, qsl, _ = _batch()
    n = int(qsl[-1])
    out = torch.full((n + 8,), 99, dtype=torch.int32)
    mk.token_request_mapping(qsl, out, len(qsl) - 1, n - 3, n + 4, num_warps=4)
    want = [_owner(qsl.tolist(), t) if t < n - 3 else 0 for t in range(n + 4)]
    assert out[: n + 4].tolist() == want and (out[n + 4:] == 99).all()


def test_swa_indices_and_lens_with_replay_and_padding():
    q_lens, seq_lens, qsl, bt = _batch(1)
    n, window, width = int(qsl[-1]), 16, 16
    t2r = torch.tensor([_owner(qsl.tolist(), t) for t in range(n)], dtype=torch.int32)
    valid = torch.ones(n, dtype=torch.bool)
    valid[-2] = False
    replay = torch.tensor([0, 0, 3, 0, 1], dtype=torch.int32)
    idx = torch.full((n, 1, width), 7, dtype=torch.int32)
    lens = torch.full((n,), 7, dtype=torch.int32)
    mk.swa_indices_and_lens(idx, lens, window, width, lens, lens, qsl, seq_lens, t2r, valid, bt, BLOCK,
                            replay, num_tokens=n, token_offset=0)
    for t in range(n):
        r = int(t2r[t])
        pos = int(seq_lens[r]) - q_lens[r] + t - int(qsl[r])
        start = max(pos - window + 1, 0, int(replay[r]))
        want_len = pos + 1 - start if valid[t] else 0
        want = [int(bt[r, p // BLOCK]) * BLOCK + p % BLOCK for p in range(start, pos + 1)] if valid[t] else []
        assert int(lens[t]) == want_len
        assert idx[t, 0].tolist() == want + [-1] * (width - len(want))


def test_prefill_gather_lens():
    q_lens, seq_lens, qsl, _ = _batch(2)
    replay = torch.tensor([0, 0, 5, 400, 0], dtype=torch.int32)
    out = torch.zeros(3, dtype=torch.int32)
    mk.prefill_gather_lens(out, seq_lens, qsl, replay, 3, 2, 128)
    for i, r in enumerate(range(2, 5)):
        prefix = int(seq_lens[r]) - q_lens[r]
        assert int(out[i]) == q_lens[r] + min(max(prefix - int(replay[r]), 0), 127)


def test_compressed_slot_mapping():
    q_lens, seq_lens, qsl, bt = _batch(3)
    n, ratio, bs = int(qsl[-1]), 4, BLOCK // 4
    slots = torch.arange(n, dtype=torch.int64)
    slots[3] = -1
    out = torch.full((n,), -1, dtype=torch.int64)
    mk.compressed_slot_mapping(out, slots, qsl, seq_lens, bt, bs, ratio, 1, 1)
    for t in range(n):
        r = _owner(qsl.tolist(), t)
        pos = int(seq_lens[r]) - q_lens[r] + t - int(qsl[r])
        ok = (pos + 1) % ratio == 0 and slots[t] != -1
        state = pos // ratio
        assert int(out[t]) == (int(bt[r, state // bs]) * bs + state % bs if ok else -1), t


def test_prepare_uniform_decode():
    seq_lens = torch.tensor([10, 1, 0], dtype=torch.int32)
    bt = torch.arange(12, dtype=torch.int32).view(3, 4)
    m, n = 2, 6
    dsl, ebt, dl = torch.zeros(8, dtype=torch.int32), torch.zeros(8, 4, dtype=torch.int32), torch.zeros(8, dtype=torch.int32)
    mk.prepare_uniform_decode(seq_lens, dsl, bt, ebt, dl, n, m)
    assert dsl[:n].tolist() == [9, 10, 0, 1, 0, 0]
    assert torch.equal(ebt[:n], bt.repeat_interleave(m, 0)) and dl[:n].tolist() == [1] * n


def test_prefill_chunk_metadata_with_query_slice():
    q_lens, seq_lens, qsl, _ = _batch(4)
    ratio = 4
    comp = (seq_lens // ratio).to(torch.int32)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), comp.cumsum(0)]).to(torch.int32)
    total, n = int(cu[-1]), int(qsl[-1])
    lo, hi = 3, n - 10
    t2s = torch.full((total,), -7, dtype=torch.int32)
    ks, ke = torch.zeros(hi - lo, dtype=torch.int32), torch.zeros(hi - lo, dtype=torch.int32)
    mk.prefill_chunk_metadata(qsl, seq_lens, cu, cu, t2s, ks, ke, lo, hi, 0, 1, 1, num_reqs=5, COMPRESS_RATIO=ratio)
    for t in range(lo, hi):
        r = _owner(qsl.tolist(), t)
        ctx = int(seq_lens[r]) - q_lens[r] + 1 + t - int(qsl[r])
        assert (int(ks[t - lo]), int(ke[t - lo])) == (int(cu[r]), int(cu[r]) + ctx // ratio)
    assert t2s.tolist() == [r for r in range(5) for _ in range(int(comp[r]))]

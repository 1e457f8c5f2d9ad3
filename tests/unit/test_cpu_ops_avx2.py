"""The torch versions of DeepSeek-V4's CPU ops (what vLLM's AVX2 kernel library lacks) against
vLLM's own AVX-512 kernels on the same inputs, at tiny and DeepSeek-V4-Flash dims, plus direct
computations and the registration itself.

The stock kernels exist only where vLLM loads its AVX-512 library (`_C`); on an AVX2 machine the
comparisons skip and the direct tests still run.
"""

from __future__ import annotations

import math

import pytest
import torch

from vllm.platforms import current_platform

from vllm_ampere.attention.reference import compressor_state, indexer_fp8, sparse_mla, swa_insert
from vllm_ampere.attention.rope import gptj_rope
from vllm_ampere.cpu import gemm, mhc, ops

current_platform.import_kernels()  # the kernel library vLLM's workers load on this CPU
STOCK = not ops.missing_ops()
stock = pytest.mark.skipif(not STOCK, reason="this CPU's vLLM kernel library lacks the DeepSeek-V4 ops (AVX2)")
FLASH = dict(hidden=4096, hc=4, heads=64, groups=8, o_lora_rank=1024, index_heads=64)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _cos_sin(max_pos: int, rope: int = 64) -> torch.Tensor:
    inv = 1.0 / (10000 ** (torch.arange(0, rope, 2, dtype=torch.float32) / rope))
    ang = torch.arange(max_pos, dtype=torch.float32).unsqueeze(-1) * inv
    return torch.cat((ang.cos(), ang.sin()), -1).contiguous()


def _fp8_ds_mla_cache(blocks: int, block_size: int, pad: int = 0) -> torch.Tensor:
    """2-D [blocks, bytes] uint8 cache whose row stride exceeds a block (as vLLM's pooled pages)."""
    full = torch.zeros(blocks, block_size * sparse_mla.TOKEN_BYTES + pad, dtype=torch.uint8)
    return full[:, : block_size * sparse_mla.TOKEN_BYTES]


def _assert_bf16_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """fp32 math in another order: at most one bf16 rounding step apart, on few elements."""
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=8e-3, atol=1e-5)
    assert (ours != theirs).float().mean() < 0.02


def _assert_fp8_bytes_match_stock(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Equal bytes, except where the stock AVX-512 kernel flushed an e4m3 subnormal to (+-)0."""
    diff = ours != theirs
    if diff.any():
        subnormal = (ours & 0x78) == 0  # exponent field zero
        assert bool(((theirs & 0x7F) == 0)[diff].all() and subnormal[diff].all()), \
            f"{int(diff.sum())} bytes differ beyond subnormal flushes"


# -- hyper-connections --------------------------------------------------------------------------

def _hc_inputs(t: int, hc: int, d: int, seed: int):
    g = _gen(seed)
    x = torch.randn(t, hc, d, generator=g).to(torch.bfloat16)
    fn = torch.randn(2 * hc + hc * hc, hc * d, generator=g) * 0.02
    scale = torch.tensor([0.5, 0.7, 0.9])
    base = torch.randn(2 * hc + hc * hc, generator=g) * 0.1
    return x, fn, scale, base


def test_hc_pre_direct_small():
    x, fn, scale, base = _hc_inputs(3, 2, 8, 0)
    y, post, comb = mhc.hc_pre(x, fn, scale, base, 2, 1, 1e-6, 1e-6)
    flat = x.reshape(3, -1).double()
    for t in range(3):
        mixes = (fn.double() @ flat[t]) / math.sqrt(float(flat[t].square().mean()) + 1e-6)
        pre = torch.sigmoid(mixes[:2] * 0.5 + base[:2].double()) + 1e-6
        assert post[t].tolist() == pytest.approx((2 * torch.sigmoid(mixes[2:4] * 0.7 + base[2:4].double())).tolist(), rel=1e-5)
        c = torch.softmax(mixes[4:].view(2, 2) * 0.9 + base[4:].double().view(2, 2), -1) + 1e-6
        assert comb[t].flatten().tolist() == pytest.approx((c / (c.sum(0) + 1e-6)).flatten().tolist(), rel=1e-5)
        want = (pre.unsqueeze(-1) * x[t].double()).sum(0)
        torch.testing.assert_close(y[t].double(), want, rtol=8e-3, atol=1e-2)


@stock
@pytest.mark.parametrize("t,hc,d", [(5, 2, 64), (8, FLASH["hc"], FLASH["hidden"])])
def test_hc_ops_match_stock(t, hc, d):
    x, fn, scale, base = _hc_inputs(t, hc, d, 1)
    ours = mhc.hc_pre(x, fn, scale, base, hc, 20, 1e-6, 1e-6)
    theirs = torch.ops._C.hc_pre_fused_cpu(x, fn, scale, base, hc, 20, 1e-6, 1e-6)
    _assert_bf16_close(ours[0], theirs[0])
    for a, b in zip(ours[1:], theirs[1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    xo = torch.randn(t, d, generator=_gen(2)).to(torch.bfloat16)
    post, comb = theirs[1], theirs[2]
    _assert_bf16_close(mhc.hc_post(xo, x, post, comb), torch.ops._C.hc_post_fused_cpu(xo, x, post, comb))
    fnh, sch, bh = fn[:hc] * 2, torch.tensor([0.3]), base[:hc]
    _assert_bf16_close(mhc.hc_head(x, fnh, sch, bh, 1e-6, 1e-6),
                       torch.ops._C.hc_head_fused_cpu(x, fnh, sch, bh, 1e-6, 1e-6))


# -- wo_a GEMM ----------------------------------------------------------------------------------

def test_bmm_direct_and_pack_is_layout_identity():
    g = _gen(3)
    w = torch.randn(2, 3, 8, generator=g).to(torch.bfloat16)
    x = torch.randn(2, 4, 8, generator=g).to(torch.bfloat16)
    packed = gemm.convert_weight_packed(w)
    assert torch.equal(packed, w) and packed.data_ptr() != w.data_ptr()
    out = torch.empty(2, 4, 3, dtype=torch.bfloat16)
    gemm.bmm(out, x, packed, True, None)
    want = torch.einsum("bmk,bnk->bmn", x.double(), w.double())
    torch.testing.assert_close(out.double(), want, rtol=8e-3, atol=1e-2)
    with pytest.raises(ValueError, match="out"):
        gemm.bmm(torch.empty(2, 4, 4, dtype=torch.bfloat16), x, packed, True, None)


@stock
@pytest.mark.parametrize("groups,rank,k,t", [(2, 32, 64, 3), (FLASH["groups"], FLASH["o_lora_rank"], 8 * 512, 5)])
def test_packed_bmm_matches_stock_pair(groups, rank, k, t):
    # cpu_sparse.py: packed = convert_weight_packed(wo_a [G, R, K]); bmm_cpu(z [G, T, R], o [G, T, K], packed, True)
    g = _gen(4)
    w = (torch.randn(groups, rank, k, generator=g) * 0.02).to(torch.bfloat16)
    x = torch.randn(groups, t, k, generator=g).to(torch.bfloat16)
    ours = torch.empty(groups, t, rank, dtype=torch.bfloat16)
    gemm.bmm(ours, x, gemm.convert_weight_packed(w), True, None)
    theirs = torch.empty_like(ours)
    torch.ops._C.bmm_cpu(theirs, x, torch.ops._C.convert_weight_packed(w), True, None)
    torch.testing.assert_close(ours, theirs, rtol=8e-3, atol=1e-3)


# -- SWA insert, decode -------------------------------------------------------------------------

def _swa_inputs(t: int, heads: int, blocks: int, block_size: int, seed: int):
    g = _gen(seed)
    q = torch.randn(t, heads, 512, generator=g).to(torch.bfloat16)
    kv = torch.randn(t, 512, generator=g).to(torch.bfloat16)
    positions = torch.randint(0, 4000, (t,), generator=g)
    slots = torch.randperm(blocks * block_size, generator=g)[:t]
    slots[::5] = -1
    return q, kv, positions, slots, _cos_sin(4096)


def test_qnorm_rope_kv_insert_direct_small():
    q, kv, positions, slots, cs = _swa_inputs(4, 2, 2, 4, 5)
    cache = _fp8_ds_mla_cache(2, 4, pad=64)
    q_out = swa_insert.qnorm_rope_kv_insert(q, kv, positions, cache, slots, cs, 3, 1e-6, 4)
    assert q_out.shape == (4, 3, 512) and not q_out[:, 2].any()
    for t in range(4):
        p = int(positions[t])
        qn = q[t, 0].double() / math.sqrt(float(q[t, 0].double().square().mean()) + 1e-6)
        e, o = qn[448::2], qn[449::2]
        cos, sin = cs[p, :32].double(), cs[p, 32:].double()
        torch.testing.assert_close(q_out[t, 0, 448::2].double(), e * cos - o * sin, rtol=8e-3, atol=1e-2)
        torch.testing.assert_close(q_out[t, 0, 449::2].double(), e * sin + o * cos, rtol=8e-3, atol=1e-2)
    valid = slots >= 0
    rows = sparse_mla.dequantize_fp8_ds_mla(cache, 4, slots.clamp_min(0), valid)
    want = gptj_rope(kv.float(), positions, cs)
    torch.testing.assert_close(rows[valid], want[valid], rtol=0.07, atol=0.07)  # e4m3: 3 mantissa bits


@stock
@pytest.mark.parametrize("t,heads", [(6, 2), (16, FLASH["heads"])])
def test_qnorm_rope_kv_insert_matches_stock(t, heads):
    q, kv, positions, slots, cs = _swa_inputs(t, heads, 4, 64, 6)
    ours_cache, theirs_cache = _fp8_ds_mla_cache(4, 64, 128), _fp8_ds_mla_cache(4, 64, 128)
    ours = swa_insert.qnorm_rope_kv_insert(q, kv, positions, ours_cache, slots, cs, heads, 1e-6, 64)
    theirs = torch.ops._C.fused_qnorm_rope_kv_insert_cpu(q, kv, positions, theirs_cache, slots, cs, heads, 1e-6, 64)
    _assert_bf16_close(ours, theirs)
    _assert_fp8_bytes_match_stock(ours_cache, theirs_cache)


def _filled_cache(blocks: int, block_size: int, seed: int) -> torch.Tensor:
    cache = _fp8_ds_mla_cache(blocks, block_size, pad=32)
    rows = torch.randn(blocks * block_size, 512, generator=_gen(seed)).to(torch.bfloat16)
    sparse_mla.insert_fp8_ds_mla(cache, block_size, torch.arange(blocks * block_size), rows)
    return cache


@stock
@pytest.mark.parametrize("t,heads,window,extra", [(3, 2, 8, 0), (4, 2, 8, 20), (5, FLASH["heads"], 128, 512)])
def test_flash_mla_with_kvcache_matches_stock(t, heads, window, extra):
    g = _gen(7)
    win_cache, cmp_cache = _filled_cache(4, 64, 8), _filled_cache(8, 2, 9)
    q = torch.randn(t, heads, 512, generator=g).to(torch.bfloat16)
    win = torch.randint(0, 4 * 64, (t, window), generator=g)
    win[:, window // 2:] = -1  # a short window
    win[0, 1] = 4 * 64 + 3  # out of range: skipped
    cmp = torch.randint(0, 16, (t, extra), generator=g)
    if extra:
        cmp[:, extra - 3:] = -1
    sink = torch.randn(heads, generator=g)
    args = (win_cache, win, 64, cmp_cache if extra else win_cache, cmp, 2 if extra else 1, sink, 512 ** -0.5)
    ours, theirs = torch.empty_like(q), torch.empty_like(q)
    ops.flash_mla_with_kvcache(ours, q, *args)
    torch.ops._C.flash_mla_with_kvcache_cpu(theirs, q, *args)
    # The stock kernel rounds the probabilities to bf16 before P @ V; ours keeps fp32.
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=0.02, atol=0.02 * theirs.float().abs().max().item())


# -- compressor -----------------------------------------------------------------------------------

def test_save_partial_states_direct():
    g = _gen(10)
    kv, score = torch.randn(5, 16, generator=g), torch.randn(5, 16, generator=g)
    ape = torch.randn(4, 16, generator=g)
    positions = torch.tensor([0, 1, 2, 3, 4])
    state = torch.zeros(3, 4, 32)
    compressor_state.save_partial_states(kv, score, ape, positions, state, torch.tensor([5, -1, 0, 11, 2]))
    rows = state.view(12, 32)
    for t, slot in ((0, 5), (2, 0), (3, 11), (4, 2)):
        assert torch.equal(rows[slot, :16], kv[t]) and torch.equal(rows[slot, 16:], score[t] + ape[t % 4])
    assert not rows[[1, 3, 4, 6, 7, 8, 9, 10]].any()


@stock
@pytest.mark.parametrize("width,ratio", [(1024, 4), (256, 4), (512, 128)])
def test_compressor_ops_match_stock(width, ratio):
    """save_partial_states, then compress_norm_rope_store(_indexer) for a token at each block end."""
    g = _gen(11)
    n, bs = 2 * ratio + 3, 8
    head = width // 2 if ratio == 4 else width  # overlap (ratio 4) keeps two head-wide halves
    kv_score = torch.randn(n, 2 * width, generator=g)
    kv, score = kv_score.split([width, width], -1)
    ape = torch.randn(ratio, width, generator=g)
    positions = torch.arange(n)
    slots = torch.arange(n) + 1
    states = [torch.zeros(8 * ratio // bs + 4, bs, 2 * width) for _ in range(2)]
    compressor_state.save_partial_states(kv, score, ape, positions, states[0], slots)
    torch.ops._C.save_partial_states_cpu(kv, score, ape, positions, states[1], slots)
    assert torch.equal(states[0], states[1])
    window = (2 if ratio == 4 else 1) * ratio
    local = positions.unsqueeze(-1) - window + 1 + torch.arange(window)
    gather = torch.where(local >= 0, local + 1, -1)
    weight = (1 + 0.1 * torch.randn(head, generator=g))
    cs = _cos_sin(4096)
    blocks, kbs = 4, 4
    per_token = sparse_mla.TOKEN_BYTES if head == 512 else head + 4
    caches = [torch.zeros(blocks, kbs * per_token, dtype=torch.uint8) for _ in range(2)]
    kv_slots = positions // ratio
    name = "compress_norm_rope_store_cpu" if head == 512 else "compress_norm_rope_store_indexer_cpu"
    args = (states[0], gather, positions, kv_slots, weight, 1e-6, cs)
    ops.OPS[name].impl(*args, caches[0], kbs, ratio)
    getattr(torch.ops._C, name)(*args, caches[1], kbs, ratio)
    if head == 512:
        _assert_fp8_bytes_match_stock(caches[0], caches[1])
    else:
        assert torch.equal(caches[0], caches[1])


# -- output projection's inverse RoPE -------------------------------------------------------------

@stock
@pytest.mark.parametrize("t,heads", [(3, 2), (9, FLASH["heads"])])
def test_inverse_rope_matches_stock_and_undoes_rope(t, heads):
    g = _gen(12)
    o = torch.randn(t, heads, 512, generator=g).to(torch.bfloat16)
    positions = torch.randint(0, 4000, (t,), generator=g)
    cs = _cos_sin(4096)
    ours = ops.OPS["inverse_gptj_rope_o_proj_cpu"].impl(o, positions, cs, 64)
    theirs = torch.ops._C.inverse_gptj_rope_o_proj_cpu(o, positions, cs, 64)
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    back = gptj_rope(ours.float(), positions, cs)
    torch.testing.assert_close(back, o.float(), rtol=0.02, atol=0.02)


# -- indexer --------------------------------------------------------------------------------------

def _indexer_cache(blocks: int, block_size: int, seed: int) -> torch.Tensor:
    g = _gen(seed)
    cache = torch.zeros(blocks, block_size * 132 + 64, dtype=torch.uint8)[:, : block_size * 132]
    vals = (torch.randn(blocks, block_size * 128, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    cache[:, : block_size * 128] = vals.view(torch.uint8)
    scales = torch.rand(blocks, block_size, generator=g) * 0.01 + 1e-3
    cache[:, block_size * 128:] = scales.view(torch.uint8).view(blocks, -1)
    return cache


@stock
@pytest.mark.parametrize("t,heads", [(3, 2), (7, FLASH["index_heads"])])
def test_indexer_q_quant_matches_stock(t, heads):
    g = _gen(13)
    q = torch.randn(t, heads, 128, generator=g).to(torch.bfloat16).float()
    q[0, 0] *= 1e-6  # amax below the 1e-4 floor
    positions = torch.randint(0, 4000, (t,), generator=g)
    w = torch.randn(t, heads, generator=g)
    cs = _cos_sin(4096)
    q8, w8 = torch.empty(t, heads, 128, dtype=torch.float8_e4m3fn), torch.empty(t, heads)
    ops.fused_indexer_q_rope_quant(positions, q, cs, q8, w, 0.125, heads ** -0.5, w8)
    s8, sw = torch.empty_like(q8), torch.empty_like(w8)
    torch.ops._C.fused_indexer_q_rope_quant_cpu(positions, q, cs, s8, w, 0.125, heads ** -0.5, sw)
    assert (q8.view(torch.uint8) != s8.view(torch.uint8)).float().mean() < 0.005  # RoPE op order flips a few
    torch.testing.assert_close(q8.float(), s8.float(), rtol=0.07, atol=0)
    torch.testing.assert_close(w8, sw, rtol=1e-6, atol=0)


@stock
@pytest.mark.parametrize("b,heads,block_size", [(2, 2, 4), (3, FLASH["index_heads"], 64)])
def test_paged_logits_and_topk_match_stock(b, heads, block_size):
    g = _gen(14)
    blocks = 24
    cache = _indexer_cache(blocks, block_size, 15)
    q8 = torch.randn(b, heads, 128, generator=g).clamp(-448, 448).to(torch.float8_e4m3fn)
    w = torch.randn(b, heads, generator=g)
    max_pages = blocks // b
    seq_lens = torch.tensor([max_pages * block_size - 3, 5, max_pages * block_size][:b], dtype=torch.int32)
    table = torch.randperm(blocks, generator=g)[: b * max_pages].view(b, max_pages).to(torch.int32)
    n = int(seq_lens.max())
    ours = indexer_fp8.paged_mqa_logits(q8, cache, w, seq_lens, table, block_size, n)
    theirs = torch.ops._C.fp8_paged_mqa_logits_cpu(q8, cache, w, seq_lens, table, block_size, n)
    for r in range(b):
        L = int(seq_lens[r])
        torch.testing.assert_close(ours[r, :L], theirs[r, :L], rtol=1e-5, atol=1e-5 * theirs[r, :L].abs().max().item())
        assert torch.isneginf(ours[r, L:]).all()
    outs = []
    for fn in (indexer_fp8.topk_transform_512, torch.ops._C.topk_transform_512_cpu):
        page, raw = torch.empty(b, 512, dtype=torch.int32), torch.empty(b, 512, dtype=torch.int32)
        fn(ours, seq_lens, table, page, block_size, raw)
        outs.append((page, raw))
    for r in range(b):
        L = int(seq_lens[r])
        for ours_idx, theirs_idx in zip(outs[0], outs[1]):
            if L <= 512:
                assert torch.equal(ours_idx[r], theirs_idx[r])
            else:
                assert torch.equal(ours_idx[r].sort().values, theirs_idx[r].sort().values)


def test_topk_transform_direct_ties_and_pages():
    scores = torch.tensor([[1.0] * 600, [0.0] * 600])
    scores[0, 550:] = 2.0  # 50 clear winners, then 462 of the tied 1.0s: the lowest positions
    page, raw = torch.empty(2, 512, dtype=torch.int32), torch.empty(2, 512, dtype=torch.int32)
    table = torch.arange(2 * 150).view(2, 150).flip(1).to(torch.int32)
    indexer_fp8.topk_transform_512(scores, torch.tensor([600, 3]), table, page, 4, raw)
    assert sorted(raw[0].tolist()) == list(range(462)) + list(range(550, 600))
    assert raw[1, :3].tolist() == [0, 1, 2] and (raw[1, 3:] == -1).all() and (page[1, 3:] == -1).all()
    assert page[1, :3].tolist() == [int(table[1, 0]) * 4 + i for i in range(3)]


# -- registration ---------------------------------------------------------------------------------

def test_registered_ops_carry_stock_schemas_and_fakes():
    ns = "vllm_ampere_avx2_test"
    ops.register_missing_ops(ns)
    assert ops.register_missing_ops(ns) == []  # idempotent
    scratch = getattr(torch.ops, ns)
    for name, op in ops.OPS.items():
        got = str(getattr(scratch, name).default._schema)
        assert got == f"{ns}::{name}{op.schema}"
        if STOCK and name != "convert_weight_packed":  # stock spells its alias info oddly
            assert got.replace(ns, "_C") == str(getattr(torch.ops._C, name).default._schema)
    x, fn, scale, base = _hc_inputs(3, 4, 64, 16)
    y, post, comb = scratch.hc_pre_fused_cpu(x, fn, scale, base, 4, 20, 1e-6, 1e-6)
    assert torch.equal(y, mhc.hc_pre(x, fn, scale, base, 4, 20, 1e-6, 1e-6)[0])
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        fy, fpost, fcomb = scratch.hc_pre_fused_cpu(fx, mode.from_tensor(fn), mode.from_tensor(scale),
                                                    mode.from_tensor(base), 4, 20, 1e-6, 1e-6)
        assert (fy.shape, fpost.shape, fcomb.shape, fpost.dtype) == ((3, 64), (3, 4), (3, 4, 4), torch.float32)


def test_pair_registration_refuses_half_a_pair():
    ns = "vllm_ampere_avx2_pair_test"
    lib = torch.library.Library(ns, "FRAGMENT")
    lib.define("bmm_cpu(Tensor(a!) out, Tensor mat1, Tensor mat2, bool is_vnni, Tensor? scale) -> ()")
    with pytest.raises(RuntimeError, match="convert_weight_packed"):
        ops.register_missing_ops(ns)


@stock
def test_patch_leaves_a_complete_library_alone():
    from vllm_ampere.patches import all_patches

    patch = next(p for p in all_patches() if p.name == "cpu_avx2_torch_ops")
    patch.check()
    assert ops.kernel_library_loaded() and ops.missing_ops() == []
    assert ops.register_missing_ops() == []

"""The fast INT4/INT8 arithmetic against the plain-loop reference of the spec: bit for bit."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import convert_reference as ref  # noqa: E402

from vllm_ampere.convert.codecs import decode_mxfp4, pack_nibbles  # noqa: E402
from vllm_ampere.convert.errors import ConversionError  # noqa: E402
from vllm_ampere.convert.int4 import Int4Quantizer, divisor_grid, grid_for_mode  # noqa: E402
from vllm_ampere.convert.int8 import quantize_block, quantize_channel  # noqa: E402

GRID = grid_for_mode("mse")


@pytest.fixture(scope="module")
def mse():
    return Int4Quantizer(GRID, chunk_values=1024)  # small chunks: the chunk seams are exercised too


def _groups_to_tensors(codes: list[list[int]], scales: list[int]):
    """codes: one list of 32 e2m1 codes per group -> (packed uint8 [G, 16], scale uint8 [G, 1])."""
    c = torch.tensor(codes, dtype=torch.uint8)
    return pack_nibbles(c), torch.tensor(scales, dtype=torch.uint8).reshape(-1, 1)


def _assert_same(quantizer, weight, scale, grid=GRID):
    got = quantizer(weight, scale)
    want_w, want_s, want_err = ref.quantize_experts(weight.numpy(), scale.numpy(), list(grid))
    np.testing.assert_array_equal(got.weight.numpy(), want_w)
    np.testing.assert_array_equal(got.scale.view(torch.int16).numpy().view(np.uint16), want_s)
    assert got.err.flatten().tolist() == [float(e) for e in want_err]
    return got


def test_random_tensors_bit_exact(mse):
    gen = torch.Generator().manual_seed(1)
    weight = torch.randint(0, 256, (24, 128), dtype=torch.uint8, generator=gen)
    scale = torch.randint(100, 135, (24, 8), dtype=torch.uint8, generator=gen)
    _assert_same(mse, weight, scale)


def test_adversarial_groups_bit_exact(mse):
    codes, scales = [], []
    codes.append([0] * 32); scales.append(120)  # all zero
    codes.append([8] * 32); scales.append(120)  # all negative zero
    for pos, code in ((0, 1), (31, 15), (7, 9)):  # a single non-zero
        g = [0] * 32
        g[pos] = code
        codes.append(g); scales.append(127)
    codes.append([7, 15] * 16); scales.append(127)  # max-magnitude e2m1 (+-6) only
    codes.append(list(range(16)) * 2); scales.append(118)  # every code
    codes.append([11] + [0] * 31); scales.append(127)  # divisors 6.0 and another tie exactly
    codes.append([3, 13] + [0] * 30); scales.append(127)  # another exact tie
    _assert_same(mse, *_groups_to_tensors(codes, scales))


def test_every_e8m0_exponent_bit_exact(mse):
    # Every exponent 0..254, with codes whose decode stays finite at the top exponents.
    gen = torch.Generator().manual_seed(2)
    codes, scales = [], []
    for u in range(255):
        limit = 3 if u >= 253 else 8  # |code| <= 1.0 where 6 * 2^(u-127) would overflow fp32
        c = torch.randint(0, limit, (32,), generator=gen) + 8 * torch.randint(0, 2, (32,), generator=gen)
        codes.append(c.tolist()); scales.append(u)
    _assert_same(mse, *_groups_to_tensors(codes, scales))


@pytest.mark.parametrize("mode", ["absmax7", "absmax8"])
def test_absmax_modes_bit_exact(mode):
    grid = grid_for_mode(mode)
    gen = torch.Generator().manual_seed(3)
    weight = torch.randint(0, 256, (8, 64), dtype=torch.uint8, generator=gen)
    scale = torch.randint(110, 130, (8, 4), dtype=torch.uint8, generator=gen)
    _assert_same(Int4Quantizer(grid), weight, scale, grid)


def test_mse_never_worse_than_absmax7_and_within_bound(mse):
    gen = torch.Generator().manual_seed(4)
    weight = torch.randint(0, 256, (64, 256), dtype=torch.uint8, generator=gen)
    scale = torch.randint(100, 135, (64, 16), dtype=torch.uint8, generator=gen)
    r = mse(weight, scale)
    assert bool((r.err <= r.err_absmax7).all())
    assert r.err.sum() < r.err_absmax7.sum()
    _check_int4_bound(weight, scale, r)


def _check_int4_bound(weight, scale, r):
    """|q*s - g| <= s/2 (plus fp32 rounding of g/s) where q is not clamped; = |g| - |q| s where it is."""
    g = decode_mxfp4(weight, scale)
    nib = torch.stack((r.weight & 0xF, r.weight >> 4), -1).flatten(-2).to(torch.float32) - 8
    s = r.scale.to(torch.float32).repeat_interleave(32, 1)
    deq = nib * s
    err = (deq - g).abs()
    clamped = ((nib == -8) & (g < -8.5 * s)) | ((nib == 7) & (g > 7.5 * s))
    assert bool((err[~clamped] <= s[~clamped] * (0.5 + 2.0**-20)).all())
    assert bool((err[clamped] <= (g.abs() - nib.abs() * s)[clamped] * (1 + 2.0**-20)).all())


def test_group_beyond_fp32_is_rejected(mse):
    weight, scale = _groups_to_tensors([[7] + [0] * 31], [254])  # 6 * 2^127 overflows fp32
    with pytest.raises(ConversionError, match="beyond fp32 range"):
        mse(weight, scale)


def test_grid_parsing():
    assert len(divisor_grid(5.0, 9.5, 0.25)) == 19
    assert divisor_grid(5.0, 9.4, 0.25)[-1] == 9.25  # never past STOP
    assert len(divisor_grid(1.0, 16.0, 0.1)) == 151  # 15 / 0.1 is 149.99... in floats
    with pytest.raises(ConversionError):
        divisor_grid(0.5, 9.5, 0.25)  # below the proven-exact range
    with pytest.raises(ConversionError):
        divisor_grid(5.0, 9.5, 0.0)


def _dense_cases():
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((260, 300)) * 0.02).astype(np.float32)
    w[3] = 0.0  # a == 0
    w[5] = 1e-42  # a/127 rounds to 0 in bf16: q = 0
    w[7, :2] = (0.5, -0.5)  # exact halves after scaling
    return w


def test_int8_channel_bit_exact():
    w = _dense_cases()
    r = quantize_channel(torch.from_numpy(w))
    q, bits = ref.int8_rows(w)
    np.testing.assert_array_equal(r.weight.numpy().astype(np.int64) - 128, q)
    np.testing.assert_array_equal(r.scale.view(torch.int16).numpy().view(np.uint16), bits)
    s = r.scale.to(torch.float32).unsqueeze(1)
    err = (r.dequant - torch.from_numpy(w)).abs()
    unclamped = ((r.weight.to(torch.int64) - 128).abs() < 127) & (s > 0)
    assert bool((err[unclamped] <= (s * (0.5 + 2.0**-20)).expand_as(err)[unclamped]).all())
    assert bool((err[(s == 0).expand_as(err)] <= 2.0**-133).all())  # below the smallest bf16 step


def test_int8_block_bit_exact():
    w = _dense_cases()
    r = quantize_block(torch.from_numpy(w))
    q, bits = ref.int8_blocks(w)
    np.testing.assert_array_equal(r.weight.numpy().astype(np.int64), q)
    np.testing.assert_array_equal(r.scale.view(torch.int16).numpy().view(np.uint16), bits)


# The fast path: e8m0 bytes whose whole arithmetic is the e = 0 arithmetic times powers of two.
SCALED_U = range(65, 191)  # e = -62 .. 63 for the default grid: below, squared terms underflow fp32; above, they overflow


def _scaled_bytes_numpy(grid) -> list[int]:
    """The scaled e8m0 bytes, derived independently of the package: numpy fp32 arrays for every
    (u, largest magnitude, divisor incl. absmax7, code up to that magnitude) against u = 127."""
    f32 = np.float32
    mags = np.array(ref.MAGNITUDES[1:], dtype=f32)  # non-zero largest magnitudes
    codes = np.array(ref.MAGNITUDES, dtype=f32)
    used = codes[None, :] <= mags[:, None]  # [7, 8]: codes that occur under each largest magnitude
    divs = np.array(list(grid) + [7.0], dtype=f32)

    def arithmetic(u):
        p = f32(2.0 ** (u - 127))
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            a = (mags * p)[:, None, None]
            s = np.vectorize(ref.bf16, otypes=[f32])(a / divs[None, :, None])
            g = np.concatenate((codes, -codes)).astype(f32)[None, None, :] * p
            q = np.clip(np.rint(g / s), -8, 7).astype(f32)  # rint: half to even
            d = q * s - g
            return s, q, d * d

    s0, q0, t0 = arithmetic(127)
    mask = np.concatenate((used, used), axis=1)[:, None, :].repeat(len(divs), 1)
    scaled = []
    for u in range(255):
        s, q, t = arithmetic(u)
        p = 2.0 ** (u - 127)
        if (
            (s.astype(np.float64) == s0.astype(np.float64) * p).all()
            and (q[mask] == q0[mask]).all()
            and (t[mask].astype(np.float64) == t0[mask].astype(np.float64) * p * p).all()
        ):
            scaled.append(u)
    return scaled


@pytest.mark.parametrize(
    "grid, expected",
    [(GRID, SCALED_U), (grid_for_mode("absmax7"), range(63, 193)), (grid_for_mode("absmax8"), range(63, 192)),
     (divisor_grid(1.0, 16.0, 0.25), range(65, 190))],  # the widest grid the converter accepts
)
def test_scaled_exponent_range_is_exact(grid, expected):
    q = Int4Quantizer(grid)
    package = [u for u in range(256) if q.fast_u[u]]
    assert package == _scaled_bytes_numpy(grid) == list(expected)


def _boundary_groups(us, gen):
    """Per u: for each largest magnitude, a group with every code up to it (both signs) and a random one."""
    codes, scales = [], []
    for u in us:
        for mag in range(1, 8):
            if ref.MAGNITUDES[mag] * 2.0 ** (u - 127) > float(np.finfo(np.float32).max):
                continue  # decodes beyond fp32: rejected
            every = [c for c in range(mag + 1)] + [8 + c for c in range(mag + 1)]
            codes.append((every * 16)[:32]); scales.append(u)
            rnd = torch.randint(0, mag + 1, (32,), generator=gen) + 8 * torch.randint(0, 2, (32,), generator=gen)
            rnd[int(torch.randint(0, 32, (1,), generator=gen))] = mag  # the largest magnitude occurs
            codes.append(rnd.tolist()); scales.append(u)
    return codes, scales


def test_scaled_range_boundaries_bit_exact(mse):
    edges = (SCALED_U[0], SCALED_U[-1])
    us = sorted({0, 1, 126, 127, 128, 252, 253, 254} | {e + d for e in edges for d in (-2, -1, 0, 1, 2)})
    gen = torch.Generator().manual_seed(8)
    got = _assert_same(mse, *_groups_to_tensors(*_boundary_groups(us, gen)))
    assert np.isinf(got.err.numpy()).any()  # the top exponents do reach infinite errors


def test_fast_and_direct_paths_agree_on_every_exponent():
    """Every group through the direct path (the spec's arithmetic at its own u) gives what the
    routed quantizer gives, on many random groups at every u 0..254, incl. mixed chunks."""
    q = Int4Quantizer(GRID, chunk_values=4096)
    gen = torch.Generator().manual_seed(9)
    u = torch.randint(0, 255, (64, 64), dtype=torch.uint8, generator=gen)
    w = torch.randint(0, 256, (64, 1024), dtype=torch.uint8, generator=gen)
    top = (u >= 253).repeat_interleave(16, 1)
    w = torch.where(top, w & 0x33, w)  # |code| <= 1.0 where larger ones overflow fp32
    w[::3] &= torch.randint(0, 256, w[::3].shape, dtype=torch.uint8, generator=gen) & 0x55  # smaller magnitudes
    r = q(w, u)
    flat = w.reshape(-1, 16)
    mag = torch.maximum(flat & 7, flat >> 4 & 7).amax(1).long()
    packed, scale, err, err7, signal, dmax = q.direct.quantize(flat, u.reshape(-1).long() * 8 + mag)
    assert torch.equal(r.weight.reshape(-1, 16), packed)
    assert torch.equal(r.scale.flatten(), scale.to(torch.bfloat16))
    for got, want in ((r.err, err), (r.err_absmax7, err7), (r.signal, signal)):
        assert torch.equal(got.flatten(), want)
    assert r.max_abs_err == float(dmax)
    assert bool((~r.scale.flatten().float().isnan()).all())


def test_chunks_and_threads_give_identical_results():
    gen = torch.Generator().manual_seed(10)
    w = torch.randint(0, 256, (48, 2048), dtype=torch.uint8, generator=gen)
    u = torch.randint(60, 200, (48, 128), dtype=torch.uint8, generator=gen)  # fast and direct groups
    before = torch.get_num_threads()
    settings = ((1 << 20, 1), (4096, 1), (4096, 2), (1024, 3))  # (chunk_values, threads)
    results = [Int4Quantizer(GRID, chunk_values=cv, threads=t)(w, u) for cv, t in settings]
    assert torch.get_num_threads() == before  # the chunk threads leave torch's setting alone
    for r in results[1:]:
        assert torch.equal(r.scale.view(torch.int16), results[0].scale.view(torch.int16))
        for f in ("weight", "err", "err_absmax7", "signal"):
            assert torch.equal(getattr(r, f), getattr(results[0], f))
        assert r.max_abs_err == results[0].max_abs_err


def test_report_columns_match_decoded_values(mse):
    """signal, err_absmax7 and max_abs_err recomputed from the decoded values and the absmax7 spec."""
    gen = torch.Generator().manual_seed(11)
    w = torch.randint(0, 256, (16, 256), dtype=torch.uint8, generator=gen)
    u = torch.randint(60, 200, (16, 16), dtype=torch.uint8, generator=gen)
    r = mse(w, u)
    g = decode_mxfp4(w, u).to(torch.float64)
    assert torch.equal(r.signal, (g * g).unflatten(-1, (-1, 32)).sum(-1))
    _, _, err7 = ref.quantize_experts(w[:2].numpy(), u[:2].numpy(), [7.0])
    assert r.err_absmax7[:2].flatten().tolist() == [float(e) for e in err7]
    nib = torch.stack((r.weight & 0xF, r.weight >> 4), -1).flatten(-2).to(torch.float64) - 8
    deq = nib * r.scale.to(torch.float64).repeat_interleave(32, 1)
    assert r.max_abs_err == float((deq.to(torch.float32) - g.to(torch.float32)).abs().max())


def test_group_beyond_fp32_names_its_group_in_a_later_chunk():
    q = Int4Quantizer(GRID, chunk_values=1024, threads=2)
    w = torch.zeros(8, 512, dtype=torch.uint8)
    u = torch.full((8, 32), 120, dtype=torch.uint8)
    w[5, 16 * 7] = 7; u[5, 7] = 254  # group 5 * 32 + 7 = 167, in the sixth chunk
    with pytest.raises(ConversionError, match=r"group 167 \(scale byte 254\)"):
        q(w, u)


def test_wide_grid_two_limbs_bit_exact():
    """The widest accepted grid needs two fp32 limbs per term: still the reference's bytes."""
    grid = divisor_grid(1.0, 16.0, 0.25)
    q = Int4Quantizer(grid, chunk_values=512)
    assert q.fast.limbs == 2
    gen = torch.Generator().manual_seed(12)
    weight = torch.randint(0, 256, (4, 128), dtype=torch.uint8, generator=gen)
    weight[0] |= 0x77  # every value at magnitude 6: the clamped, largest terms
    scale = torch.randint(100, 135, (4, 8), dtype=torch.uint8, generator=gen)
    got = _assert_same(q, weight, scale, grid)
    _, _, err7 = ref.quantize_experts(weight.numpy(), scale.numpy(), [7.0])
    assert got.err_absmax7.flatten().tolist() == [float(e) for e in err7]

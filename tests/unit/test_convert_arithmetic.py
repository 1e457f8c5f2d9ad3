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

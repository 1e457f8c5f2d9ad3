"""The spec's arithmetic (SPEC-dsv4_int.md section 3) as a plain loop: slow, obviously correct.

Independent of the package on purpose: numpy float32 scalars for every fp32 step, BF16 rounding
done on the bits, Python's round() (ties to even), and the group error summed exactly with
Fraction (the package's documented reading of `sum(...)  # fp32`: the fp32 squared terms,
summed without rounding). Used by the tests and by benchmarks/bench_convert.py.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

F32 = np.float32
MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def bf16(x) -> np.float32:
    """fp32 -> bf16 (round to nearest, ties to even) -> fp32, on the bit pattern."""
    bits = int(np.array(x, dtype=F32).view(np.uint32))
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return np.array(bits, dtype=np.uint32).view(F32)[()]


def e2m1(code: int) -> np.float32:
    value = MAGNITUDES[code & 7]
    return F32(-value if code & 8 else value)


def pow2(u: int) -> np.float32:
    assert u != 255, "e8m0 NaN"
    return F32(2.0 ** (u - 127))


def decode_group(codes: list[int], u: int) -> list[np.float32]:
    with np.errstate(over="ignore"):
        return [e2m1(c) * pow2(u) for c in codes]


def quantize_group(g: list[np.float32], divisors: list[float], qmin: int = -8, qmax: int = 7):
    """-> (scale as fp32 holding a bf16 value, codes q, exact error or inf)."""
    a = max(abs(x) for x in g)
    if a == 0:
        return F32(0.0), [0] * len(g), Fraction(0)
    best = None
    with np.errstate(over="ignore", invalid="ignore"):
        for div in divisors:
            s = bf16(F32(a) / F32(div))
            q = [min(max(round(float(x / s)), qmin), qmax) for x in g]
            terms = [(F32(qi) * s - x) * (F32(qi) * s - x) for qi, x in zip(q, g)]
            err = float("inf") if any(np.isinf(t) for t in terms) else sum(Fraction(float(t)) for t in terms)
            if best is None or err < best[2]:
                best = (s, q, err)
    return best


def quantize_experts(weight: np.ndarray, scale: np.ndarray, divisors: list[float]):
    """MXFP4 uint8 [N, K/2] + e8m0 uint8 [N, K/32] -> (uint8 [N, K/2], bf16 bits uint16 [N, K/32], errors)."""
    n, half_k = weight.shape
    out = np.zeros_like(weight)
    out_scale = np.zeros(scale.shape, dtype=np.uint16)
    errors = []
    for row in range(n):
        for grp in range(scale.shape[1]):
            packed = weight[row, grp * 16 : grp * 16 + 16]
            codes = [int(b) >> shift & 0xF for b in packed for shift in (0, 4)]
            g = decode_group(codes, int(scale[row, grp]))
            s, q, err = quantize_group(g, divisors)
            for j in range(16):
                out[row, grp * 16 + j] = (q[2 * j] + 8) | ((q[2 * j + 1] + 8) << 4)
            out_scale[row, grp] = int(np.array(s, dtype=F32).view(np.uint32)) >> 16
            errors.append(err)
    return out, out_scale, errors


def int8_rows(w: np.ndarray):
    """Dense channel: fp32 [N, K] -> (q int [N, K], bf16 scale bits [N]); s == 0 gives q == 0."""
    n, k = w.shape
    q = np.zeros((n, k), dtype=np.int64)
    bits = np.zeros(n, dtype=np.uint16)
    for row in range(n):
        q[row], bits[row] = _int8_block([F32(x) for x in w[row]])
    return q, bits


def int8_blocks(w: np.ndarray, block: int = 128):
    """Dense block: fp32 [N, K] -> (q int [N, K], bf16 scale bits [ceil(N/128), ceil(K/128)])."""
    n, k = w.shape
    q = np.zeros((n, k), dtype=np.int64)
    bits = np.zeros((-(-n // block), -(-k // block)), dtype=np.uint16)
    for bi in range(bits.shape[0]):
        for bj in range(bits.shape[1]):
            tile = w[bi * block : (bi + 1) * block, bj * block : (bj + 1) * block]
            flat, bits[bi, bj] = _int8_block([F32(x) for x in tile.flatten()])
            q[bi * block : (bi + 1) * block, bj * block : (bj + 1) * block] = np.array(flat).reshape(tile.shape)
    return q, bits


def _int8_block(values: list[np.float32]):
    a = max(abs(x) for x in values)
    s = bf16(F32(a) / F32(127.0))
    if s == 0:
        return [0] * len(values), 0
    return [min(max(round(float(x / s)), -127), 127) for x in values], int(np.array(s, dtype=F32).view(np.uint32)) >> 16

"""Routed experts: MXFP4 -> INT4 (uint4b8 nibbles, BF16 scale per group of 32), SPEC section 3.

Why tables. Within one MXFP4 group every value is code * 2^(u-127), with one e8m0 byte u and
16 possible codes. So for a group with scale byte u and largest magnitude code m, the spec's
whole computation for one candidate divisor (s = bf16(a/div), q = clamp(rne(g/s)), the fp32
squared error term of each element) depends only on (u, m, div, code). We evaluate it once
for every such combination, literally in fp32 with one torch op per spec step, on the CPU
(so every device uses the very same table); a group's work shrinks to table lookups per byte.

The error sum. The spec's `err = sum((q*s - g)**2)  # fp32` leaves the order of additions open,
and in fp32 the order can flip a comparison between two close candidates. We define err as the
exact sum of the fp32-rounded squared terms. It is computed in float64, which is exact here:
in a group every term is a multiple of 2^(2e-24) and below 2^(2e+12) (e = u-127, divisors in
[1, 16]: s >= 2^(e-5) so q*s - g is a multiple of 2^(e-12) and below 2^(e+6) in magnitude),
so any partial sum of 32 terms needs at most 41 significant bits. An infinite term (fp32
overflow at the top exponents) makes err infinite. Exact sums make the decision independent of
device, thread count and summation order; ties go to the smaller divisor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .codecs import E2M1_MAGNITUDES, MXFP4_GROUP, bf16, e2m1_table, e8m0_table
from .errors import ConversionError

DEFAULT_GRID = (5.0, 9.5, 0.25)  # START, STOP, STEP of --mse-grid: 19 divisors
ABSMAX7 = 7.0  # the quality report compares every mode against absmax7
_CODES = 16
_MAGS = len(E2M1_MAGNITUDES)
_KEYS = 256 * _MAGS  # key = u * 8 + index of the group's largest magnitude
DIVISOR_RANGE = (1.0, 16.0)  # keeps the exactness bound of the module doc
OVERFLOW = 2.0**1000  # stands for an infinite fp32 term; any finite group error is below 2^273


def divisor_grid(start: float, stop: float, step: float) -> tuple[float, ...]:
    """The fp32 divisors start, start+step, ..., stop (inclusive), ascending."""
    if step <= 0 or stop < start:
        raise ConversionError(f"bad divisor grid {start}:{stop}:{step}: need step > 0 and stop >= start")
    n = int(round((stop - start) / step)) + 1
    grid = tuple(float(torch.tensor(start + i * step, dtype=torch.float32)) for i in range(n))
    if grid[0] < DIVISOR_RANGE[0] or grid[-1] > DIVISOR_RANGE[1]:
        raise ConversionError(f"divisor grid {grid[0]}..{grid[-1]} leaves [{DIVISOR_RANGE[0]}, {DIVISOR_RANGE[1]}]")
    if len(set(grid)) != len(grid):
        raise ConversionError(f"divisor grid {start}:{stop}:{step} has repeated fp32 divisors")
    return grid


def grid_for_mode(scale_mode: str, mse_grid: tuple[float, float, float] = DEFAULT_GRID) -> tuple[float, ...]:
    """absmax7/absmax8 are the one-candidate grids [7] and [8]; mse is the user's grid."""
    if scale_mode == "absmax7":
        return (7.0,)
    if scale_mode == "absmax8":
        return (8.0,)
    if scale_mode == "mse":
        return divisor_grid(*mse_grid)
    raise ConversionError(f"unknown scale mode {scale_mode!r}")


@dataclass(frozen=True)
class Int4Result:
    weight: torch.Tensor  # uint8 [N, K/2]: nibbles q + 8, low nibble = element 2j
    scale: torch.Tensor  # bfloat16 [N, K/32]
    err: torch.Tensor  # float64 [N, K/32]: the chosen candidate's exact group error
    err_absmax7: torch.Tensor  # float64 [N, K/32]: what absmax7 would have left
    signal: torch.Tensor  # float64 [N, K/32]: sum of g^2 per group
    max_abs_err: float  # largest |q*s - g| of the tensor


class Int4Quantizer:
    """Quantizes MXFP4 tensors for one divisor grid; build once, call per tensor.

    The tables are indexed by byte (two codes): a group's candidate errors are the sum over its
    16 bytes of per-byte error pairs (one embedding_bag), and each output byte is a lookup.
    """

    def __init__(self, grid: Sequence[float], device: torch.device | str = "cpu", chunk_values: int = 1 << 21):
        self.grid = tuple(grid)
        if list(self.grid) != sorted(set(self.grid)):
            raise ConversionError(f"divisor grid must be strictly ascending, got {self.grid}")
        self.device = torch.device(device)
        self.chunk_groups = max(1, chunk_values // MXFP4_GROUP)
        terms, scales, codes, absdiff, finite = _tables(self.grid)
        lo, hi = torch.arange(256) & 0xF, torch.arange(256) >> 4
        c = len(self.grid)
        # [KEYS * 256, C + 2] float64: exact, since both terms are multiples of one power of two.
        self.bag = (terms[:, lo, :] + terms[:, hi, :]).reshape(_KEYS * 256, c + 2).to(self.device)
        self.scales = scales.to(self.device)  # bfloat16 [KEYS, C]
        self.out_bytes = (codes[:, :, lo] | (codes[:, :, hi] << 4)).flatten().to(self.device)  # uint8 [KEYS*C*256]
        self.absdiff = torch.maximum(absdiff[:, :, lo], absdiff[:, :, hi]).flatten().to(self.device)
        self.finite = finite.to(self.device)  # bool [KEYS]

    def __call__(self, weight_u8: torch.Tensor, scale_u8: torch.Tensor) -> Int4Result:
        n, half_k = weight_u8.shape
        if scale_u8.shape != (n, half_k * 2 // MXFP4_GROUP) or (half_k * 2) % MXFP4_GROUP:
            raise ConversionError(f"MXFP4 weight {tuple(weight_u8.shape)} and scale {tuple(scale_u8.shape)} disagree")
        w = weight_u8.to(self.device).reshape(-1, MXFP4_GROUP // 2)
        u = scale_u8.to(self.device).reshape(-1)
        outs = [self._chunk(w[i : i + self.chunk_groups], u[i : i + self.chunk_groups]) for i in range(0, u.numel(), self.chunk_groups)]
        packed, scale, err, err7, signal, dmax = (torch.cat(parts) for parts in zip(*outs))
        groups = (n, half_k * 2 // MXFP4_GROUP)
        return Int4Result(
            packed.reshape(n, half_k), scale.reshape(groups), err.reshape(groups), err7.reshape(groups),
            signal.reshape(groups), float(dmax.max()) if dmax.numel() else 0.0,
        )

    def _chunk(self, w: torch.Tensor, u: torch.Tensor):
        mag = torch.maximum(w & 7, (w >> 4) & 7).amax(dim=1)
        key = u.long() * _MAGS + mag.long()
        if not bool(self.finite[key].all()):
            bad = int(torch.nonzero(~self.finite[key])[0])
            raise ConversionError(
                f"MXFP4 group {bad} (scale byte {int(u[bad])}) decodes to a value beyond fp32 range"
            )
        wl = w.long()
        sums = F.embedding_bag(key.unsqueeze(1) * 256 + wl, self.bag, mode="sum")  # [G, C + 2], exact
        sums.clamp_(max=OVERFLOW)  # every infinite error equal: a tie, as inf == inf
        c = len(self.grid)
        best = torch.argmin(sums[:, :c], dim=1)  # first minimum: ties keep the smaller divisor
        idx = ((key * c + best) * 256).unsqueeze(1) + wl
        err, err7 = (_inf(x) for x in (sums.gather(1, best.unsqueeze(1)).squeeze(1), sums[:, c]))
        return self.out_bytes[idx], self.scales[key, best], err, err7, sums[:, c + 1], self.absdiff[idx].amax().reshape(1)


def _inf(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= OVERFLOW, float("inf"), x)


def _tables(grid: tuple[float, ...]):
    """The spec's per-element arithmetic for every (u, largest magnitude, divisor, code), in fp32."""
    divs = torch.tensor(grid + (ABSMAX7,), dtype=torch.float32)
    pow2 = e8m0_table()  # [256]
    code_vals = e2m1_table()  # [16]
    mags = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32)
    g = code_vals.view(1, 1, 1, _CODES) * pow2.view(256, 1, 1, 1)  # [256, 1, 1, 16]
    a = mags.view(1, _MAGS, 1, 1) * pow2.view(256, 1, 1, 1)  # [256, 8, 1, 1]
    s = bf16(a / divs.view(1, 1, -1, 1)).to(torch.float32)  # rounded to BF16 before scoring
    q = torch.clamp(torch.round(g / s), -8, 7)  # torch.round: half to even
    prod = q * s  # separate ops: no fused multiply-add, same on every device
    diff = prod - g
    terms = diff * diff
    absdiff = diff.abs()
    # Codes above the group's largest magnitude never occur; a == 0 means scale 0 and q 0.
    code_mag = torch.arange(_CODES) & 7
    unused = code_mag.view(1, 1, 1, _CODES) > torch.arange(_MAGS).view(1, _MAGS, 1, 1)
    zero_group = (torch.arange(_MAGS) == 0).view(1, _MAGS, 1, 1)
    q = torch.where(unused | zero_group, 0.0, q).expand(256, _MAGS, len(divs), _CODES)
    terms = torch.where(unused | zero_group, 0.0, terms).expand_as(q)
    absdiff = torch.where(unused | zero_group, 0.0, absdiff).expand_as(q)
    s = torch.where(zero_group.squeeze(-1), 0.0, s.squeeze(-1)).expand(256, _MAGS, len(divs))
    # 0 * inf is NaN in the matmul, so an infinite term travels as OVERFLOW and comes back as inf.
    terms = torch.where(torch.isinf(terms), OVERFLOW, terms.to(torch.float64))
    signal = torch.where(unused, 0.0, g.to(torch.float64) ** 2).expand(256, _MAGS, 1, _CODES)
    terms = torch.cat((terms, signal), dim=2)  # [256, 8, C+2, 16]
    finite = torch.isfinite(a.view(256, _MAGS)) & _finite_codes(g.view(256, _CODES))
    finite[255] = False  # e8m0 NaN
    c = len(grid)
    return (
        terms.reshape(_KEYS, len(divs) + 1, _CODES).transpose(1, 2).contiguous(),  # [KEYS, 16, C + 2]
        bf16(s[:, :, :c].reshape(_KEYS, c)),
        (q[:, :, :c].reshape(_KEYS, c, _CODES) + 8).to(torch.uint8),
        absdiff[:, :, :c].reshape(_KEYS, c, _CODES).contiguous(),
        finite.reshape(_KEYS),
    )


def _finite_codes(g: torch.Tensor) -> torch.Tensor:
    """[256, 16] decoded values -> [256, 8]: every code up to each magnitude decodes finite."""
    ok = torch.isfinite(g[:, :8]) & torch.isfinite(g[:, 8:])  # magnitude i, both signs
    return torch.cumprod(ok.to(torch.int64), dim=1).bool()

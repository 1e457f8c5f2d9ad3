"""Routed experts: MXFP4 -> INT4 (uint4b8 nibbles, BF16 scale per group of 32), SPEC section 3.

The error sum. The spec's `err = sum((q*s - g)**2)  # fp32` leaves the order of additions open,
and in fp32 the order can flip a comparison between two close candidates. We define err as the
exact sum of the fp32-rounded squared terms; exact sums make the decision independent of device,
thread count and summation order; ties go to the smaller divisor.

Why it is fast. Every value of an MXFP4 group is code * 2^e, e = u - 127 for the group's e8m0
byte u. So a = m * 2^e for the group's largest magnitude m (one of 7 non-zero e2m1 magnitudes),
and while no fp32/BF16 step leaves the normal range, each step of the spec's arithmetic scales
exactly: s = 2^e * s0, q = q0 and the fp32 term = 4^e * term0, where s0, q0, term0 are the
spec's arithmetic at e = 0. The choice of divisor then depends only on m and the codes. The
exponents where this holds are not assumed but found: the spec's arithmetic is evaluated in fp32
for every (u, m, divisor, code) and u is "scaled" when all of it equals the e = 0 values times
the power of two (a few MB of work, on the CPU, so every device uses the same tables). For the
default grid that is u = 65..190 (e = -62..63): below, squared terms underflow fp32; above,
they overflow. Real weights sit far inside (u about 110..125).

Scaled groups use per-byte tables keyed by (m, byte): 8 x 256 rows (~340 KB with the output
table), which stay in L2, where a table per (u, m, byte) took 88 MB. At e = 0 the terms of one
magnitude are integer multiples of a power of two (found from the table: 2^-24 for m = 0.5 up to
2^-16 for m = 6), and with the default grid each is below 2^19 such units, so a group's sum of
32 stays below 2^24: fp32 embedding_bag (FBGEMM's fast kernel; float64 takes a generic path
~100x slower) is then exact in any order, on any device. Wider grids split the terms into
base-2^19 limbs (more columns), joined in float64. The sum is scaled by 4^e, also exactly. The
absmax7 error and the signal of the quality report are two more columns of the same lookup
(exact, ~10% of it).

Other groups (u near 0 or 255, where fp32 underflows or overflows) take the direct path: per-code
float64 terms of the spec's arithmetic at their own u, summed exactly (every term is a multiple
of 2^(2e-24) or of fp32's 2^-149 and below 2^(2e+12), so partial sums of 32 need at most 41
significant bits); an infinite term makes err infinite.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
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
_KEYS = 256 * _MAGS  # direct path: key = u * 8 + index of the group's largest magnitude
_BASE_U = 127  # e = 0
DIVISOR_RANGE = (1.0, 16.0)  # keeps the bounds of the module doc
OVERFLOW = 2.0**1000  # stands for an infinite fp32 term; any finite group error is below 2^273
_DIFF_UNIT = 2.0**-12  # at e = 0 every |q*s - g| is a multiple of this
_LIMB_BITS = 19  # a group's sum of 32 limbs below 2^19 stays below 2^24: exact in fp32


def divisor_grid(start: float, stop: float, step: float) -> tuple[float, ...]:
    """The fp32 divisors start, start+step, ... up to stop (inclusive when on the grid), ascending."""
    if step <= 0 or stop < start:
        raise ConversionError(f"bad divisor grid {start}:{stop}:{step}: need step > 0 and stop >= start")
    n = math.floor((stop - start) / step * (1 + 1e-12)) + 1  # 1:16:0.1 is 150.0 steps, not 149.99...
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

    chunk_values bounds the working set (about 30 bytes per value); the CPU default, 2^17, was
    the fastest of 2^15..2^20 on a 2-core EPYC (smaller: per-op overhead; larger: cache misses).
    On the CPU, chunks run on `threads` Python threads (default: torch.get_num_threads() at each
    call) with torch's intra-op threads set to 1 meanwhile. The result depends on neither.
    """

    def __init__(
        self, grid: Sequence[float], device: torch.device | str = "cpu", chunk_values: int | None = None,
        threads: int | None = None,
    ):
        self.grid = tuple(grid)
        if list(self.grid) != sorted(set(self.grid)):
            raise ConversionError(f"divisor grid must be strictly ascending, got {self.grid}")
        self.device = torch.device(device)
        if chunk_values is None:  # a GPU wants few, large launches (H200: 2^22 3.0e9 values/s, 2^24 4.9e9)
            chunk_values = 1 << 17 if self.device.type == "cpu" else 1 << 24
        self.chunk_groups = max(1, chunk_values // MXFP4_GROUP)
        self.threads = threads  # CPU: chunks in parallel; None: torch.get_num_threads() at each call
        spec = _spec_arithmetic(self.grid)
        # Per key (u, magnitude index): 0 scaled (fast path), 1 direct path, 2 beyond fp32.
        direct = ~_scaled_exponents(spec).view(256, 1).expand(256, _MAGS)
        route = torch.where(spec.finite, direct.to(torch.uint8), 2)
        self.fast_u = (route.amax(dim=1) == 0).tolist()  # u whose every group takes the fast path
        self.route = route.reshape(_KEYS).to(self.device)
        self.fast = _FastTables(spec, len(self.grid), self.device)
        self.direct = _DirectTables(spec, len(self.grid), self.device)

    def __call__(self, weight_u8: torch.Tensor, scale_u8: torch.Tensor) -> Int4Result:
        n, half_k = weight_u8.shape
        if scale_u8.shape != (n, half_k * 2 // MXFP4_GROUP) or (half_k * 2) % MXFP4_GROUP:
            raise ConversionError(f"MXFP4 weight {tuple(weight_u8.shape)} and scale {tuple(scale_u8.shape)} disagree")
        w = weight_u8.to(self.device).reshape(-1, MXFP4_GROUP // 2)
        u = scale_u8.to(self.device).reshape(-1)
        groups = u.numel()
        packed = torch.empty_like(w)
        scale = torch.empty(groups, dtype=torch.bfloat16, device=self.device)
        err, err7, signal = (torch.empty(groups, dtype=torch.float64, device=self.device) for _ in range(3))
        def chunk(i: int) -> list[torch.Tensor]:
            sl = slice(i, i + self.chunk_groups)
            return self._chunk(i, w[sl], u[sl], packed[sl], scale[sl], err[sl], err7[sl], signal[sl])

        starts = range(0, groups, self.chunk_groups)
        threads = torch.get_num_threads() if self.threads is None else self.threads
        if self.device.type != "cpu" or threads <= 1 or len(starts) <= 1:
            dmax = [m for i in starts for m in chunk(i)]
        else:
            # Chunks in parallel threads, each op single-threaded: no barrier per op, which on a
            # busy machine (one descheduled OpenMP thread stalls the whole op) costs 10x and more.
            # Torch threads pick up the intra-op thread count when they first run an op.
            intra = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                with ThreadPoolExecutor(threads, thread_name_prefix="int4") as pool:
                    dmax = [m for ms in pool.map(chunk, starts) for m in ms]  # the first failing chunk raises
            finally:
                torch.set_num_threads(intra)
        dmax.append(torch.zeros((), dtype=torch.float64, device=self.device))
        shape = (n, half_k * 2 // MXFP4_GROUP)
        return Int4Result(
            packed.reshape(n, half_k), scale.reshape(shape), err.reshape(shape), err7.reshape(shape),
            signal.reshape(shape), float(torch.stack(dmax).max()),
        )

    def _chunk(self, first, w, u, packed, scale, err, err7, signal) -> list[torch.Tensor]:
        """Writes the chunk's outputs; returns its largest |q*s - g| (one or two 0-dim tensors)."""
        mag = torch.maximum(w & 7, (w >> 4) & 7).amax(dim=1).long()  # index of the largest magnitude
        dmax = [self.fast.quantize(w, u, mag, packed, scale, err, err7, signal)]
        lo, hi = (int(x) for x in torch.aminmax(u))  # one sync per chunk on CUDA
        if all(self.fast_u[lo : hi + 1]):
            return dmax
        key = u.long() * _MAGS + mag
        route = self.route[key]
        if bool((route == 2).any()):
            bad = int(torch.nonzero(route == 2)[0])
            raise ConversionError(
                f"MXFP4 group {first + bad} (scale byte {int(u[bad])}) decodes to a value beyond fp32 range"
            )
        idx = torch.nonzero(route).flatten()
        *outs, direct_dmax = self.direct.quantize(w[idx], key[idx])
        for dst, src in zip((packed, scale, err, err7, signal), outs):
            dst[idx] = src.to(dst.dtype)  # the direct scale is a BF16 value held in fp32
        # The fast path's figures for these groups were meaningless: take its maximum again without them.
        fast_groups = route == 0
        return [self.fast.max_abs_err(w[fast_groups], u[fast_groups], mag[fast_groups]), direct_dmax]


@dataclass(frozen=True)
class _Spec:
    """The spec's arithmetic for every (u, magnitude index, divisor, code); the divisor axis is
    the grid then absmax7. Codes above a group's largest magnitude never occur and a == 0 means
    scale 0 and q 0: those entries hold 0 terms and q 0."""

    s: torch.Tensor  # float32 [256, 8, D]: bf16(a / div)
    q: torch.Tensor  # float32 [256, 8, D, 16]
    term: torch.Tensor  # float32 [256, 8, D, 16]: the fp32 squared error term
    absdiff: torch.Tensor  # float32 [256, 8, D, 16]: |q*s - g|
    signal: torch.Tensor  # float64 [256, 8, 16]: g^2
    finite: torch.Tensor  # bool [256, 8]: every code up to the magnitude decodes finite


def _spec_arithmetic(grid: tuple[float, ...]) -> _Spec:
    divs = torch.tensor(grid + (ABSMAX7,), dtype=torch.float32)
    pow2 = e8m0_table()  # [256]
    g = e2m1_table().view(1, 1, 1, _CODES) * pow2.view(256, 1, 1, 1)  # [256, 1, 1, 16]
    a = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32).view(1, _MAGS, 1, 1) * pow2.view(256, 1, 1, 1)
    with torch.no_grad():
        s = bf16(a / divs.view(1, 1, -1, 1)).to(torch.float32)  # rounded to BF16 before scoring
        q = torch.clamp(torch.round(g / s), -8, 7)  # torch.round: half to even
        prod = q * s  # separate ops: no fused multiply-add, same on every device
        diff = prod - g
        term = diff * diff
    unused = (torch.arange(_CODES) & 7).view(1, 1, 1, _CODES) > torch.arange(_MAGS).view(1, _MAGS, 1, 1)
    zero_group = (torch.arange(_MAGS) == 0).view(1, _MAGS, 1, 1)
    off = unused | zero_group
    shape = (256, _MAGS, len(divs), _CODES)
    finite = torch.isfinite(a.view(256, _MAGS)) & _finite_codes(g.view(256, _CODES))
    finite[255] = False  # e8m0 NaN
    return _Spec(
        s=torch.where(zero_group.squeeze(-1), 0.0, s.squeeze(-1)).expand(shape[:3]).contiguous(),
        q=torch.where(off, 0.0, q).expand(shape).contiguous(),
        term=torch.where(off, 0.0, term).expand(shape).contiguous(),
        absdiff=torch.where(off, 0.0, diff.abs()).expand(shape).contiguous(),
        signal=torch.where(unused.squeeze(2), 0.0, g.view(256, 1, _CODES).to(torch.float64) ** 2),
        finite=finite,
    )


def _finite_codes(g: torch.Tensor) -> torch.Tensor:
    """[256, 16] decoded values -> [256, 8]: every code up to each magnitude decodes finite."""
    ok = torch.isfinite(g[:, :8]) & torch.isfinite(g[:, 8:])  # magnitude i, both signs
    return torch.cumprod(ok.to(torch.int64), dim=1).bool()


def _scaled_exponents(spec: _Spec) -> torch.Tensor:
    """bool [256]: u whose whole arithmetic is the e = 0 arithmetic times powers of two."""
    p = e8m0_table().to(torch.float64).view(256, 1, 1)  # 2^e, exact in float64 (NaN at 255)
    b = _BASE_U

    def same(x: torch.Tensor, base: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return (x.to(torch.float64) == base.to(torch.float64) * scale).flatten(1).all(1)

    return (
        same(spec.s, spec.s[b], p)
        & (spec.q == spec.q[b]).flatten(1).all(1)
        & same(spec.term, spec.term[b], (p * p).unsqueeze(-1))
        & same(spec.absdiff, spec.absdiff[b], p.unsqueeze(-1))
    )


class _FastTables:
    """Per-byte tables at e = 0 keyed by (magnitude index, byte), for scaled groups."""

    def __init__(self, spec: _Spec, c: int, device: torch.device):
        b = _BASE_U
        lo, hi = torch.arange(256) & 0xF, torch.arange(256) >> 4
        term = spec.term[b].to(torch.float64)  # [8, D, 16]
        unit = torch.tensor([_power_of_two_unit(term[m]) for m in range(_MAGS)], dtype=torch.float64)
        units = term / unit.view(-1, 1, 1)  # integers
        self.limbs = max(1, -(-int(units.max()).bit_length() // _LIMB_BITS))
        digits = [torch.div(units, 2.0 ** (_LIMB_BITS * j), rounding_mode="floor").remainder(2**_LIMB_BITS)
                  for j in reversed(range(self.limbs))]  # most significant first
        sig = spec.signal[b].unsqueeze(1) / 2.0**-2  # code^2 in quarters: integers
        cols = torch.cat((*digits, sig), dim=1)  # [8, limbs * D + 1, 16]
        self.bag = (cols[:, :, lo] + cols[:, :, hi]).transpose(1, 2).reshape(_MAGS * 256, -1)
        if float(self.bag.max()) * (MXFP4_GROUP // 2) >= 2**24:
            raise AssertionError("a group's limb sum could leave fp32's exact integers")
        self.bag = self.bag.to(torch.float32).to(device)
        self.c, self.d = c, c + 1
        # argmin as one min: units * 2^shift + divisor index, exact in float64.
        self.shift = max(1, (c - 1).bit_length())
        if float(units.max()) * MXFP4_GROUP * 2**self.shift >= 2.0**53:
            raise AssertionError("keyed group errors leave float64's exact integers")
        self.index = torch.arange(c, dtype=torch.float64, device=device)
        self.key_scale = torch.tensor(2.0**self.shift, dtype=torch.float64, device=device)
        self.limb = torch.tensor(2.0**_LIMB_BITS, dtype=torch.float64, device=device)
        self.unit = unit.to(device)  # [8]: the e = 0 term unit per magnitude index
        # Output byte and the byte's largest |q*s - g| (in 2^-12) in one int32 per (m, divisor, byte).
        q = spec.q[b, :, :c].to(torch.int32) + 8  # [8, C, 16]
        d = spec.absdiff[b, :, :c].to(torch.float64) / _DIFF_UNIT
        if not bool((d == d.round()).all()):
            raise AssertionError("e = 0 differences are not multiples of 2^-12")
        d = d.to(torch.int32)
        out_byte = q[:, :, lo] | (q[:, :, hi] << 4)
        self.out = ((torch.maximum(d[:, :, lo], d[:, :, hi]) << 8) | out_byte).flatten().to(device)
        self.s0 = spec.s[b, :, :c].reshape(-1).to(torch.float64).to(device)  # [8 * C]
        # Per u: 2^e, 4^e, the signal unit 4^e / 4, the difference unit 2^e 2^-12.
        p = e8m0_table().to(torch.float64)
        self.per_u = torch.stack((p, p * p, p * p * 0.25, p * _DIFF_UNIT), dim=1).to(device)

    def quantize(self, w, u, mag, packed, scale, err, err7, signal) -> torch.Tensor:
        """Writes the outputs of the chunk's groups; returns the largest |q*s - g| (0-dim)."""
        c, d = self.c, self.d
        idx = w.long().add_((mag * 256).unsqueeze(1))  # row (magnitude index, byte) of the bag
        sums = F.embedding_bag(idx, self.bag, mode="sum").to(torch.float64)  # [G, limbs * D + 1], exact
        units = sums[:, :d]
        for j in range(1, self.limbs):  # join the limbs, exact in float64
            units = torch.addcmul(sums[:, j * d : (j + 1) * d], units, self.limb)
        keyed = torch.amin(torch.addcmul(self.index, units[:, :c], self.key_scale), dim=1).to(torch.int64)
        best = keyed & (2**self.shift - 1)  # the smallest error; of equal ones, the smaller divisor
        per_u = self.per_u.index_select(0, u.long())
        term_unit = self.unit.take(mag).mul_(per_u[:, 1])  # exact: powers of two
        err.copy_((keyed >> self.shift).to(torch.float64).mul_(term_unit))
        err7.copy_(units[:, c].mul(term_unit))
        signal.copy_(sums[:, -1].mul(per_u[:, 2]))
        mc = mag * c + best  # (magnitude index, divisor)
        v = self.out.take(idx.add_(((mc - mag) * 256).unsqueeze(1)))  # at (magnitude index, divisor, byte)
        packed.copy_(v & 0xFF)
        scale.copy_(self.s0.take(mc).mul_(per_u[:, 0]))
        return (v >> 8).amax(dim=1).to(torch.float64).mul_(per_u[:, 3]).amax() if v.numel() else per_u.new_zeros(())

    def max_abs_err(self, w, u, mag) -> torch.Tensor:
        """The largest |q*s - g| of scaled groups, alone."""
        groups = u.numel()
        tmp = [torch.empty(groups, dtype=dt, device=w.device) for dt in (torch.bfloat16,) + (torch.float64,) * 3]
        return self.quantize(w, u, mag, torch.empty_like(w), *tmp)


class _DirectTables:
    """Per-code float64 terms at each group's own u, keyed by (u, magnitude index, code)."""

    def __init__(self, spec: _Spec, c: int, device: torch.device):
        term = spec.term.to(torch.float64)
        term = torch.where(torch.isinf(term), OVERFLOW, term)  # 0 * inf is NaN: infinities travel as OVERFLOW
        cols = torch.cat((term, spec.signal.unsqueeze(2)), dim=2)  # [256, 8, D + 1, 16]
        self.c = c
        self.bag = cols.transpose(2, 3).reshape(_KEYS * _CODES, -1).to(device)  # [KEYS * 16, D + 1]
        self.q = (spec.q[:, :, :c] + 8).to(torch.uint8).reshape(-1).to(device)  # [KEYS * C * 16]
        self.absdiff = spec.absdiff[:, :, :c].to(torch.float64).reshape(-1).to(device)
        self.s = spec.s[:, :, :c].reshape(-1).to(device)  # [KEYS * C]

    def quantize(self, w, key):
        c = self.c
        codes = torch.stack((w & 0xF, w >> 4), dim=-1).flatten(1).long()  # [G, 32]
        sums = F.embedding_bag((key * _CODES).unsqueeze(1) + codes, self.bag, mode="sum")  # exact
        sums[:, : c + 1].clamp_(max=OVERFLOW)  # every infinite error equal: a tie, as inf == inf
        best = torch.argmin(sums[:, :c], dim=1)  # first minimum: ties keep the smaller divisor
        kc = key * c + best
        idx = (kc * _CODES).unsqueeze(1) + codes
        q = self.q[idx]
        packed = q[:, 0::2] | (q[:, 1::2] << 4)
        err = _inf(sums.gather(1, best.unsqueeze(1)).squeeze(1))
        return packed, self.s[kc], err, _inf(sums[:, c]), sums[:, c + 1], self.absdiff[idx].amax()


def _power_of_two_unit(x: torch.Tensor) -> float:
    """The largest power of two of which every value of x (float64, finite) is a multiple."""
    nz = x[x != 0]
    if not nz.numel():
        return 1.0
    mantissa, exponent = torch.frexp(nz)  # x = mantissa * 2^exponent, mantissa in [0.5, 1)
    # mantissa * 2^53 is an integer; its trailing zero bits tell how far the unit can rise.
    m = (mantissa.abs() * 2.0**53).to(torch.int64)
    tz = ((m & -m).to(torch.float64).log2()).round().to(torch.int64)
    return 2.0 ** int((exponent - 53 + tz).min())


def _inf(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= OVERFLOW, float("inf"), x)

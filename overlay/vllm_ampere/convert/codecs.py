"""Exact decoders of the native number formats (SPEC section 1) and the BF16 rounding.

Every decode here is exact in fp32 (a power-of-two scale times a short code) except where the
product leaves fp32's range; callers check finiteness where that can happen.
"""

from __future__ import annotations

import torch

# e2m1 nibble -> value: bit 3 is the sign, bits 0-2 index the magnitudes.
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_VALUES = E2M1_MAGNITUDES + tuple(-m for m in E2M1_MAGNITUDES)
E8M0_NAN = 255
E4M3_NAN_BITS = 0x7F  # e4m3fn has no infinities; S.1111.111 is its only NaN (0x7F, 0xFF)
MXFP4_GROUP = 32
FP8_BLOCK = 128


def e2m1_table(device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)


def e8m0_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """fp32 value of each e8m0 byte u: 2^(u-127); u=255 (NaN) maps to NaN."""
    u = torch.arange(256, dtype=torch.float64)
    t = torch.pow(2.0, u - 127).to(torch.float32)  # every 2^k with k in [-127, 127] is exact in fp32
    t[E8M0_NAN] = float("nan")
    return t.to(device)


def bf16(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 to BF16 (round to nearest, ties to even: torch's conversion on CPU and CUDA)."""
    return x.to(torch.bfloat16)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[..., K/2] uint8 -> [..., K] uint8 codes; the low nibble is element 2j, the high 2j+1."""
    lo = packed & 0xF
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Inverse of unpack_nibbles: [..., K] uint8 in 0..15 -> [..., K/2] uint8."""
    pairs = codes.unflatten(-1, (-1, 2))
    return pairs[..., 0] | (pairs[..., 1] << 4)


def decode_mxfp4(weight_u8: torch.Tensor, scale_u8: torch.Tensor) -> torch.Tensor:
    """MXFP4 [N, K/2] bytes + e8m0 [N, K/32] bytes -> fp32 [N, K]."""
    codes = unpack_nibbles(weight_u8).long()
    vals = e2m1_table(weight_u8.device)[codes]
    pow2 = e8m0_table(weight_u8.device)[scale_u8.long()]
    return (vals.unflatten(-1, (-1, MXFP4_GROUP)) * pow2.unsqueeze(-1)).flatten(-2)


def block_grid(n: int, k: int) -> tuple[int, int]:
    """Blocks of 128x128 covering an [N, K] weight: (ceil(N/128), ceil(K/128)), the block-scale shape."""
    return -(-n // FP8_BLOCK), -(-k // FP8_BLOCK)


def block_amax(w: torch.Tensor) -> torch.Tensor:
    """max |w| of each 128x128 block of w [N, K] -> [ceil(N/128), ceil(K/128)] (edge blocks
    padded with zeros, which never raise a block's max)."""
    n, k = w.shape
    bn, bk = block_grid(n, k)
    padded = torch.zeros(bn * FP8_BLOCK, bk * FP8_BLOCK, dtype=w.dtype, device=w.device)
    padded[:n, :k] = w
    return padded.reshape(bn, FP8_BLOCK, bk, FP8_BLOCK).abs().amax(dim=(1, 3))


def expand_blocks(per_block: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """[ceil(N/128), ceil(K/128)] per-block values -> [n, k], each repeated over its block."""
    return per_block.repeat_interleave(FP8_BLOCK, 0)[:n].repeat_interleave(FP8_BLOCK, 1)[:, :k]


def decode_fp8_blocks(weight_e4m3: torch.Tensor, scale_u8: torch.Tensor) -> torch.Tensor:
    """F8_E4M3 [N, K] + e8m0 [ceil(N/128), ceil(K/128)] bytes -> fp32 [N, K]."""
    n, k = weight_e4m3.shape
    full = expand_blocks(e8m0_table(weight_e4m3.device)[scale_u8.long()], n, k)
    return weight_e4m3.view(torch.float8_e4m3fn).to(torch.float32) * full

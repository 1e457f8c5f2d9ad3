"""Dense FP8 weights -> INT8 W8A16 (SPEC section 3): `channel` (U8 q+128, BF16 [N]) or `block`
(I8 q, BF16 [ceil(N/128), ceil(K/128)]).

a = max|W| over the row (or 128x128 block), s = bf16(a/127), q = clamp(rne(W/s), -127, 127).
When s is 0 (a == 0, or a so small that a/127 rounds to 0 in BF16) every q is 0: the
dequantized values are 0 either way, and no division by zero happens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .codecs import bf16, block_amax, expand_blocks


@dataclass(frozen=True)
class Int8Result:
    weight: torch.Tensor  # uint8 [N, K] (channel: q + 128) or int8 [N, K] (block: q)
    scale: torch.Tensor  # bfloat16 [N] (channel) or [ceil(N/128), ceil(K/128)] (block)
    dequant: torch.Tensor  # fp32 [N, K]: q * s, for the quality report


def quantize_channel(w: torch.Tensor) -> Int8Result:
    s = bf16(w.abs().amax(dim=1) / 127.0)
    q = _codes(w, s.to(torch.float32).unsqueeze(1))
    return Int8Result((q + 128).to(torch.uint8), s, q * s.to(torch.float32).unsqueeze(1))


def quantize_block(w: torch.Tensor) -> Int8Result:
    s = bf16(block_amax(w) / 127.0)
    s_full = expand_blocks(s.to(torch.float32), *w.shape)
    q = _codes(w, s_full)
    return Int8Result(q.to(torch.int8), s, q * s_full)


def _codes(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    q = torch.clamp(torch.round(w / s), -127, 127)  # torch.round: half to even
    return torch.where(s == 0, 0.0, q)

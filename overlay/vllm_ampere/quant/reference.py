"""The semantics of dsv4_int weights (SPEC-dsv4_int.md section 2), in plain torch.

These define what every kernel path must compute. The CPU path of the runtime methods runs them
(dequantize once, then BF16 matmuls); tests compare the GPU kernels against them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_ampere.convert.codecs import FP8_BLOCK, expand_blocks

INT4_GROUP = 32
INT8_BLOCK = FP8_BLOCK  # `block` keeps the native FP8 128x128 blocks (SPEC section 3)


def dequant_int4(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """INT4 experts: bytes [..., N, K/2] (nibble q+8, low = element 2j) and BF16 [..., N, K/32]."""
    u = weight.view(torch.uint8)
    q = torch.stack((u & 0xF, u >> 4), dim=-1).flatten(-2).to(torch.int16) - 8  # [..., N, K]
    groups = q.unflatten(-1, (-1, INT4_GROUP)).to(torch.float32) * scale.to(torch.float32).unsqueeze(-1)
    return groups.flatten(-2).to(dtype)


def dequant_int8_channel(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """INT8 `channel`: uint8 [N, K] holding q+128, BF16 [N] row scales."""
    q = weight.view(torch.uint8).to(torch.int16) - 128
    return (q.to(torch.float32) * scale.to(torch.float32).unsqueeze(1)).to(dtype)


def dequant_int8_block(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """INT8 `block`: int8 [N, K] holding q, BF16 [ceil(N/128), ceil(K/128)] block scales."""
    n, k = weight.shape
    full = expand_blocks(scale.to(torch.float32), n, k)
    return (weight.view(torch.int8).to(torch.float32) * full).to(dtype)


def swiglu(x: torch.Tensor, limit: float | None) -> torch.Tensor:
    """silu(gate) * up over the halves of x, with DeepSeek-V4's clamp when `limit` is set.

    Same as vLLM's SiluAndMulWithClamp / silu_and_mul_with_clamp: gate clamped from above,
    up clamped on both sides.
    """
    gate, up = x.chunk(2, dim=-1)
    if limit is not None:
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
    return F.silu(gate) * up


def moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    swiglu_limit: float | None,
    expert_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """Routed experts on dequantized weights: sum_k w_k * W2_e(swiglu(W13_e x)), e = topk_ids.

    w13: [E_local, 2I, H], w2: [E_local, H, I] (dequantized, any float dtype; the matmuls run in
    it). topk_ids are global expert ids; expert_map maps them to local ids (-1: not on this rank).
    Returns [T, H] in x's dtype, without the routed scaling factor (vLLM's runner applies it).
    """
    ids = topk_ids.long()
    if expert_map is not None:  # an id of -1 (no expert) must stay -1, not index the last entry
        ids = torch.where(ids >= 0, expert_map[ids.clamp(min=0)].long(), -1)
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)
    xs = x.to(w13.dtype)
    # One matmul per expert over the tokens routed to it.
    for e in torch.unique(ids[ids >= 0]).tolist():
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        h = swiglu(xs[tok] @ w13[e].T, swiglu_limit)
        y = h.to(w2.dtype) @ w2[e].T
        out.index_add_(0, tok, y.float() * topk_weights[tok, slot].float().unsqueeze(1))
    return out.to(x.dtype)

"""Torch references of DeepSeek-V4's manifold-constrained hyper-connection ops on CPU
(`_C::hc_pre_fused_cpu`, `_C::hc_post_fused_cpu`, `_C::hc_head_fused_cpu`).

The residual stream is hc_mult copies of the hidden state. Math in fp32 as vLLM's eager
references (vllm/model_executor/kernels/mhc/torch.py `mhc_pre_torch` / `mhc_post_torch`, and
HCHeadOp's gate) and the stock AVX-512 kernels (csrc/cpu/sgl-kernels/mhc.cpp), which take one
merged `hc_eps` for the pre and Sinkhorn epsilons and a fixed post multiplier of 2.0
(vllm/model_executor/kernels/mhc/cpu.py says why this loses nothing on DeepSeek-V4).
"""

from __future__ import annotations

import torch

POST_MULT = 2.0  # the stock CPU kernel's fixed post-mix multiplier


def _rms_scaled_mixes(x: torch.Tensor, hc_fn: torch.Tensor, rms_eps: float) -> torch.Tensor:
    """x [T, hc, D] -> (flat x @ hc_fn.T) / rms(flat x), fp32 [T, rows of hc_fn]."""
    flat = x.reshape(x.shape[0], -1).to(torch.float32)
    mixes = flat @ hc_fn.to(torch.float32).t()
    return mixes * torch.rsqrt(flat.square().mean(-1, keepdim=True) + rms_eps)


def hc_pre(x: torch.Tensor, hc_fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor,
           hc_mult: int, sinkhorn_iters: int, rms_eps: float, hc_eps: float
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, hc, D] bf16; hc_fn [2 hc + hc^2, hc D] fp32; hc_scale [3]; hc_base [2 hc + hc^2].
    Returns (layer input [T, D] in x's dtype, post mix [T, hc] fp32, comb mix [T, hc, hc] fp32)."""
    t, hc, d = x.shape
    if hc != hc_mult or hc_fn.shape != (2 * hc + hc * hc, hc * d):
        raise ValueError(f"hc_pre: x {tuple(x.shape)}, hc_fn {tuple(hc_fn.shape)}, hc_mult {hc_mult} disagree")
    scale, base = hc_scale.to(torch.float32), hc_base.to(torch.float32)
    mixes = _rms_scaled_mixes(x, hc_fn, rms_eps)
    pre = torch.sigmoid(mixes[:, :hc] * scale[0] + base[:hc]) + hc_eps
    post = torch.sigmoid(mixes[:, hc: 2 * hc] * scale[1] + base[hc: 2 * hc]) * POST_MULT
    comb = mixes[:, 2 * hc:].view(t, hc, hc) * scale[2] + base[2 * hc:].view(1, hc, hc)
    comb = torch.softmax(comb, dim=-1) + hc_eps
    comb = comb / (comb.sum(-2, keepdim=True) + hc_eps)
    for _ in range(sinkhorn_iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + hc_eps)
        comb = comb / (comb.sum(-2, keepdim=True) + hc_eps)
    y = (pre.unsqueeze(-1) * x.to(torch.float32)).sum(1).to(x.dtype)
    return y, post, comb


def hc_post(x: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """out[t, j] = sum_i comb[t, i, j] * residual[t, i] + post[t, j] * x[t]: [T, hc, D] in
    residual's dtype (x [T, D], residual [T, hc, D], post [T, hc], comb [T, hc, hc])."""
    mixed = torch.einsum("tij,tid->tjd", comb.to(torch.float32), residual.to(torch.float32))
    return (mixed + post.to(torch.float32).unsqueeze(-1) * x.to(torch.float32).unsqueeze(1)).to(residual.dtype)


def hc_head(x: torch.Tensor, hc_fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor,
            hc_eps: float, norm_eps: float) -> torch.Tensor:
    """Collapse the hc streams: gate = sigmoid(mixes * scale + base) + hc_eps with mixes from the
    RMS-normalized flat residual (hc_fn [hc, hc D], hc_scale [1], hc_base [hc]);
    out [T, D] = sum_i gate_i * x_i, in x's dtype."""
    mixes = _rms_scaled_mixes(x, hc_fn, norm_eps)
    gate = torch.sigmoid(mixes * hc_scale.to(torch.float32)[0] + hc_base.to(torch.float32)) + hc_eps
    return (gate.unsqueeze(-1) * x.to(torch.float32)).sum(1).to(x.dtype)

"""The first decoder layer's hyper-connection pre-mix on sm8x: TileLang's GEMM instead of DeepGEMM."""

from __future__ import annotations

import functools

from vllm_ampere.patching import Patch


def _replace(hc_prenorm_gemm_outputs):
    @functools.wraps(hc_prenorm_gemm_outputs)
    def hc_prenorm_gemm_outputs_sm8x(x, fn, *, hidden_size, hc_mult, use_tilelang_fallback=True):
        from vllm_ampere.attention.backend import tensor_on_ampere

        if use_tilelang_fallback or not tensor_on_ampere(x):
            return hc_prenorm_gemm_outputs(x, fn, hidden_size=hidden_size, hc_mult=hc_mult,
                                           use_tilelang_fallback=use_tilelang_fallback)
        # mhc_pre_broadcast_tilelang's x is the embedding [T, hidden]: the same product with
        # one stream (hc_mult 1) of x's width, as the stock delayed pre calls the kernel.
        return hc_prenorm_gemm_outputs(x, fn, hidden_size=x.shape[1], hc_mult=1, use_tilelang_fallback=True)

    return hc_prenorm_gemm_outputs_sm8x


PATCH = Patch(
    name="mhc_prenorm_gemm_sm8x",
    target="vllm.model_executor.kernels.mhc.tilelang:_hc_prenorm_gemm_outputs",
    signature="(x: torch.Tensor, fn: torch.Tensor, *, hidden_size: int, hc_mult: int, "
    "use_tilelang_fallback: bool = True) -> tuple[torch.Tensor, torch.Tensor]",
    why="The first decoder layer of pipeline rank 0 mixes its 2-D embedding input through "
    "mhc_pre_broadcast_tilelang, which asks this function for DeepGEMM's tf32_hc_prenorm_gemm "
    "unconditionally (use_tilelang_fallback=False); DeepGEMM has no sm8x kernel, so the first "
    "forward pass fails on an A100 or RTX 3090. Every other mHC call already falls back to "
    "TileLang's prenorm GEMM where DeepGEMM is unsupported.",
    how="When x is on an sm8x GPU and DeepGEMM was demanded, runs the stock function with the "
    "TileLang fallback allowed, as one stream of x's width: TileLang's prenorm GEMM computes the "
    "same x @ fn.T and per-row sum of squares, in one split; otherwise the stock function.",
    vllm_checked="0.32.0",
    processes=("workers",),
    remove_when="mhc_pre_broadcast_tilelang honours the TileLang fallback where DeepGEMM is "
    "unsupported.",
    replace=_replace,
)

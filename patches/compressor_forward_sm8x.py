"""Run DeepSeek-V4's KV compressor store step without CuTe DSL / e4m3 Triton on sm8x GPUs."""

from __future__ import annotations

import functools

from vllm_ampere.patching import Patch


def _replace(forward):
    @functools.wraps(forward)
    def forward_sm8x(self, kv_score, positions, rotary_emb):
        from vllm_ampere.attention.backend import tensor_on_ampere

        if not tensor_on_ampere(kv_score):
            return forward(self, kv_score, positions, rotary_emb)
        from vllm_ampere.attention.compressor_forward import compressor_forward_sm8x

        return compressor_forward_sm8x(self, kv_score, positions, rotary_emb)

    return forward_sm8x


PATCH = Patch(
    name="compressor_forward_sm8x",
    target="vllm.models.deepseek_v4.compressor:DeepseekCompressor.forward",
    signature="(self, kv_score: torch.Tensor, positions: torch.Tensor, rotary_emb) -> None",
    why="The compressor's compress -> RMSNorm -> RoPE -> FP8 -> cache step runs as a CuTe DSL "
    "kernel (head 512) or a Triton kernel casting to tl.float8e4nv (head 128, the indexer keys); "
    "Triton refuses e4m3 below sm_89, so C4A/C128A layers could not fill their caches on sm8x.",
    how="On sm8x GPUs: the stock kv/score split and partial-state Triton kernel (no FP8), then "
    "vllm_ampere.attention.compressor (torch, the Triton kernels' math, checked against vLLM's "
    "CPU port) writes the fp8_ds_mla / FP8 indexer rows. Other GPUs: stock.",
    vllm_checked="0.32.0",
    processes=("workers",),
    remove_when="vLLM's compressor store has an sm80 path.",
    replace=_replace,
)

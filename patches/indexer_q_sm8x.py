"""Keep the DeepSeek-V4 indexer query in BF16 on sm8x (no e4m3 Triton store)."""

from __future__ import annotations

import functools

from vllm_ampere.patching import Patch


def _replace(fused_indexer_q_rope_quant):
    @functools.wraps(fused_indexer_q_rope_quant)
    def fused_indexer_q_rope_sm8x(positions, index_q, index_q_cos_sin_cache, index_weights,
                                  index_weights_softmax_scale, index_weights_head_scale,
                                  use_fp4=False, weights_out_dtype=None):
        from vllm_ampere.attention.backend import tensor_on_ampere

        if not tensor_on_ampere(index_q):
            kwargs = {} if weights_out_dtype is None else {"weights_out_dtype": weights_out_dtype}
            return fused_indexer_q_rope_quant(positions, index_q, index_q_cos_sin_cache, index_weights,
                                              index_weights_softmax_scale, index_weights_head_scale,
                                              use_fp4, **kwargs)
        if use_fp4:
            raise NotImplementedError("the MXFP4 indexer path is Blackwell-only")
        from vllm_ampere.attention.indexer import indexer_q_bf16

        q, w = indexer_q_bf16(positions, index_q, index_q_cos_sin_cache, index_weights,
                              index_weights_softmax_scale, index_weights_head_scale)
        return q, w if weights_out_dtype is None else w.to(weights_out_dtype)

    return fused_indexer_q_rope_sm8x


PATCH = Patch(
    name="indexer_q_sm8x",
    target="vllm.models.deepseek_v4.attention:fused_indexer_q_rope_quant",
    signature="(positions: torch.Tensor, index_q: torch.Tensor, index_q_cos_sin_cache: "
    "torch.Tensor, index_weights: torch.Tensor, index_weights_softmax_scale: float, "
    "index_weights_head_scale: float, use_fp4: bool = False, weights_out_dtype: torch.dtype = "
    "torch.float32) -> tuple[torch.Tensor | tuple[torch.Tensor, torch.Tensor], torch.Tensor]",
    why="DeepseekV4Indexer.forward quantizes its RoPE'd query to e4m3 with a Triton (or CuTe "
    "DSL) kernel; Triton refuses e4m3 below sm_89 and the FP8 query only feeds DeepGEMM.",
    how="On sm8x returns the same GPT-J RoPE'd query in BF16 and weights * softmax_scale * "
    "head_scale (there is no q scale to fold); vllm_ampere's indexer scores it. Other GPUs: stock.",
    vllm_checked="0.32.0",
    processes=("workers",),
    remove_when="The indexer path has an sm80 FP8 query kernel and scorer.",
    replace=_replace,
)

"""Build the DeepSeek-V4 indexer op on sm8x without DeepGEMM; record the IMMA decision."""

from __future__ import annotations

import functools

from vllm_ampere.patching import Patch

# What forward_cuda_sm8x reads; all are set before the stock __init__'s DeepGEMM check.
_NEEDED = ("k_cache", "topk_tokens", "topk_indices_buffer", "skip_k_cache_insert", "use_fp4_cache",
           "dcp_world_size", "use_pcp", "candidate_blocks")


def _replace(init):
    @functools.wraps(init)
    def init_sm8x(self, *args, **kwargs):
        from vllm_ampere.attention.backend import platform_on_ampere

        try:
            init(self, *args, **kwargs)
        except RuntimeError as e:
            if not (platform_on_ampere() and "DeepGEMM" in str(e)):
                raise
            missing = [a for a in _NEEDED if not hasattr(self, a)]
            if missing:  # the stock check moved: refuse rather than run half-built
                raise RuntimeError(f"SparseAttnIndexer.__init__ changed; {missing} unset") from e
        if platform_on_ampere():
            from vllm.config import get_current_vllm_config

            imma = getattr(get_current_vllm_config().quant_config, "imma", None)
            self.vllm_ampere_imma = bool(getattr(imma, "enabled", False))

    return init_sm8x


PATCH = Patch(
    name="indexer_init_sm8x",
    target="vllm.model_executor.layers.sparse_attn_indexer:SparseAttnIndexer.__init__",
    signature="(self, k_cache, quant_block_size: int, scale_fmt: str, topk_tokens: int, head_dim: "
    "int, max_model_len: int, max_total_seq_len: int, topk_indices_buffer: torch.Tensor, "
    "skip_k_cache_insert: bool = False, use_fp4_cache: bool = False, compress_ratio: int = 1, "
    "candidate_blocks: torch.Tensor | None = None, candidate_block_size: int = 0, "
    "candidate_write: bool = False)",
    why="The constructor raises 'Sparse Attention Indexer CUDA op requires DeepGEMM' on any CUDA "
    "GPU where vLLM has no DeepGEMM package (a build without it; the PyPI CUDA wheel vendors one "
    "in vllm/third_party/deep_gemm, which imports on sm8x but has no sm8x kernels); the IMMA "
    "decision lives on the quant config, which the op does not keep.",
    how="On sm8x only, lets that one error pass once every attribute the sm8x forward reads is "
    "set (otherwise re-raises), and stores `vllm_ampere_imma` from "
    "vllm_config.quant_config.imma (dsv4_int's flag; False for other configs).",
    vllm_checked="0.32.0",
    processes=("workers",),
    remove_when="vLLM's indexer has a non-DeepGEMM CUDA path.",
    replace=_replace,
)

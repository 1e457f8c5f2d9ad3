"""Keep the DeepSeek-V4 indexer's metadata builder away from DeepGEMM on sm8x."""

from __future__ import annotations

import functools

from vllm_ampere.patching import Patch


def _replace(has_deep_gemm):
    @functools.wraps(has_deep_gemm)
    def has_deep_gemm_for_this_gpu() -> bool:
        from vllm_ampere.attention.backend import platform_on_ampere

        return has_deep_gemm() and not platform_on_ampere()

    return has_deep_gemm_for_this_gpu


PATCH = Patch(
    name="indexer_metadata_sm8x",
    target="vllm.v1.attention.backends.mla.indexer:has_deep_gemm",
    signature="() -> bool",
    why="DeepseekV32IndexerMetadataBuilder.build (and update_draft_decode_metadata) call DeepGEMM's "
    "get_paged_mqa_logits_metadata for every batch with decodes whenever the deep_gemm package "
    "imports (has_deep_gemm), not when it supports the GPU (is_deep_gemm_supported). The PyPI "
    "CUDA wheel vendors DeepGEMM (vllm/third_party/deep_gemm), which imports on sm8x and refuses "
    "arch 8 ('Unsupported architecture'), so the engine's first mixed-batch warmup fails on an "
    "A100 or RTX 3090.",
    how="This module's has_deep_gemm answers False on an sm8x CUDA platform, so the builder keeps "
    "its own schedule buffer (the sm8x indexer, attention/indexer_forward.py, does not read it); "
    "the module's other readers (native decode depth, varlen, flattening) already give their "
    "non-DeepGEMM answers on sm8x. Elsewhere the stock answer.",
    vllm_checked="0.32.0",
    processes=("workers",),
    remove_when="The indexer builder gates DeepGEMM on is_deep_gemm_supported() (the GPU), not on "
    "the package importing.",
    replace=_replace,
)

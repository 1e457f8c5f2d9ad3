"""Make the DeepSeek-V4 indexer's metadata builder flatten MTP decode rows on sm8x."""

from __future__ import annotations

import functools

from vllm_ampere.patching import Patch


def _replace(supports_native_decode):
    @functools.wraps(supports_native_decode)
    def supports_native_decode_sm8x(next_n: int) -> bool:
        from vllm_ampere.attention.backend import platform_on_ampere

        if platform_on_ampere():
            return next_n == 1
        return supports_native_decode(next_n)

    return supports_native_decode_sm8x


PATCH = Patch(
    name="indexer_native_decode_sm8x",
    target="vllm.v1.attention.backends.mla.indexer:_supports_native_decode",
    signature="(next_n: int) -> bool",
    why="Without DeepGEMM kernels the stock answer for 2 query rows per request (MTP with one "
    "speculative token) is 'native': the builder then hands the indexer [B, 2] per-row lengths "
    "with 2B decode tokens, the layout of DeepGEMM's paged MQA logits. vllm_ampere's sm8x indexer "
    "scores one row per request, so every MTP decode step would fail.",
    how="On an sm8x CUDA platform, answers True only for one row per request; the builder then "
    "flattens speculative rows into one row per token (its own path for depths without a native "
    "kernel), with per-token lengths and repeated block-table rows, which the sm8x indexer scores "
    "(attention/indexer_forward.py). Elsewhere the stock answer.",
    vllm_checked="0.32.0",
    processes=("workers",),
    remove_when="The sm8x indexer scores native [B, next_n] decode rows itself.",
    replace=_replace,
)

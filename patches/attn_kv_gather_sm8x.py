"""Gather DeepSeek-V4 prefill KV from the fp8_ds_mla cache without e4m3 Triton on sm8x."""

from __future__ import annotations

import functools

from vllm_ampere.patching import Patch


def _replace(dequantize_and_gather_k_cache):
    @functools.wraps(dequantize_and_gather_k_cache)
    def dequantize_and_gather_k_cache_sm8x(out, k_cache, seq_lens, gather_lens, block_table,
                                           block_size, offset, use_fnuz=False):
        from vllm_ampere.attention.backend import tensor_on_ampere

        if use_fnuz or not tensor_on_ampere(out):
            return dequantize_and_gather_k_cache(out, k_cache, seq_lens, gather_lens, block_table,
                                                 block_size, offset, use_fnuz)
        from vllm_ampere.attention.kv_gather import gather_paged_fp8_ds_mla

        return gather_paged_fp8_ds_mla(out, k_cache, seq_lens, gather_lens, block_table, block_size, offset)

    return dequantize_and_gather_k_cache_sm8x


PATCH = Patch(
    name="attn_kv_gather_sm8x",
    target="vllm.models.deepseek_v4.nvidia.flashmla:dequantize_and_gather_k_cache",
    signature="(out: torch.Tensor, k_cache: torch.Tensor, seq_lens: torch.Tensor, gather_lens: "
    "torch.Tensor | None, block_table: torch.Tensor, block_size: int, offset: int, use_fnuz: "
    "bool = False) -> None",
    why="Prefill dequantizes the selected paged fp8_ds_mla rows into a BF16 workspace with a "
    "Triton kernel that bitcasts to tl.float8e4nv (Triton refuses e4m3 below sm_89) or a CuTe "
    "DSL kernel for Hopper+.",
    how="When the workspace is on an sm8x GPU, runs vllm_ampere.attention.kv_gather (torch, "
    "64-bit offsets, bounds-checked block-table entries); otherwise the stock function.",
    vllm_checked="0.32.0",
    processes=("workers",),
    remove_when="The stock gather has an sm80 path (e.g. a Triton kernel decoding e4m3 with "
    "integer ops), or our prefill kernel reads the paged cache directly.",
    replace=_replace,
)

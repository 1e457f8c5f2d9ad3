"""dsv4_int bytes -> the GPTQ int32 words that vLLM's Marlin repack ops take.

GPTQ packs `32 / bits` values of one column into an int32 along K, value k = p*i + j at bits
[bits*j, bits*(j+1)) (vLLM quant_utils.pack_rows / gptq_pack). dsv4_int stores the same order
byte by byte along K (INT4: low nibble = element 2j; INT8: one element per byte), so on a
little-endian host (every platform vLLM runs on) 4 consecutive bytes of a row read as one int32
are exactly that row's GPTQ word: no bit shuffling, only a reinterpretation and, for the K-first
ops, a transpose. tests/unit/test_quant_marlin_layout.py checks this against vLLM's gptq_pack.
"""

from __future__ import annotations

import sys

import torch

if sys.byteorder != "little":  # the int32 views below assume it
    raise ImportError("vllm_ampere.quant.marlin_layout needs a little-endian host")


def int4_words_n_first(weight: torch.Tensor) -> torch.Tensor:
    """INT4 experts [..., N, K/2] bytes (uint4b8 nibbles) -> int32 [..., N, K/8].

    The "canonical N-first" layout vLLM's WNA16 MoE oracle takes (its Marlin branch transposes
    to [E, K/8, N] before gptq_marlin_moe_repack).
    """
    if weight.shape[-1] % 4:
        raise ValueError(f"INT4 weight rows must hold a multiple of 8 values, got {weight.shape[-1] * 2}")
    return weight.contiguous().view(torch.int32)


def int4_gptq_qweight(weight: torch.Tensor) -> torch.Tensor:
    """INT4 [..., N, K/2] bytes -> GPTQ qweight int32 [..., K/8, N] (what gptq_marlin_repack takes)."""
    return int4_words_n_first(weight).transpose(-1, -2).contiguous()


def int8_gptq_qweight(weight_u8: torch.Tensor) -> torch.Tensor:
    """INT8 `channel` uint8 [N, K] (q + 128: already uint8b128) -> GPTQ qweight int32 [K/4, N]."""
    if weight_u8.dtype != torch.uint8 or weight_u8.dim() != 2 or weight_u8.shape[1] % 4:
        raise ValueError(f"expected uint8 [N, K] with K % 4 == 0, got {weight_u8.dtype} {tuple(weight_u8.shape)}")
    return weight_u8.contiguous().view(torch.int32).T.contiguous()

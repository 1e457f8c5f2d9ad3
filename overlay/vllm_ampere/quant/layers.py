"""Which dsv4_int method each vLLM DeepSeek-V4 layer takes (SPEC-dsv4_int.md section 4).

Pure: decided from the layer's kind and its vLLM prefix alone, so it is tested without vLLM.
Prefixes are those of the pinned vLLM's DeepSeek-V4 modules (vllm/models/deepseek_v4/).
"""

from __future__ import annotations

import enum


class Scheme(enum.Enum):
    EXPERTS_W4A16 = "experts_w4a16"  # routed experts: INT4, group 32 (Marlin MoE)
    LINEAR_W8A16 = "linears_w8a16"  # INT8 per channel (or block) weight, BF16 activations
    UNQUANTIZED = "unquantized"  # BF16/FP32 as in the checkpoint


class LayerKind(enum.Enum):
    ROUTED_EXPERTS = "routed_experts"
    LINEAR = "linear"
    OTHER = "other"  # embeddings, lm_head, attention layers: never quantized by dsv4_int


# Linear layers whose native weight is FP8 and so INT8 in a dsv4_int checkpoint, by the last
# components of their vLLM prefix.
#
# Not here, although SPEC section 4 lists it: the compressors' `fused_wkv_wgate`. DeepSeek-V4
# stores compressor wkv/wgate in BF16 (the reference inference code says so) and the pinned
# vLLM builds that layer with quant_config=None (models/deepseek_v4/compressor.py), so it never
# asks for a method and its direct `.weight` reads see BF16. Likewise `indexer.weights_proj`.
INT8_LINEAR_SUFFIXES = (
    "attn.fused_wqa_wkv",  # wq_a and wkv, merged by vLLM
    "attn.wq_b",
    "attn.wo_a",  # read directly by the inverse-RoPE output projection: see patches/dsv4_*wo_a*
    "attn.wo_b",
    "attn.indexer.wq_b",
    "shared_experts.gate_up_proj",
    "shared_experts.down_proj",
    "e_proj",  # MTP
    "h_proj",  # MTP
)


def classify(kind: LayerKind, prefix: str) -> Scheme:
    if kind is LayerKind.ROUTED_EXPERTS:
        return Scheme.EXPERTS_W4A16
    if kind is LayerKind.LINEAR and any(
        prefix == s or prefix.endswith("." + s) for s in INT8_LINEAR_SUFFIXES
    ):
        return Scheme.LINEAR_W8A16
    return Scheme.UNQUANTIZED

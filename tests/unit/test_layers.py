"""The layer classification of SPEC-dsv4_int.md section 4 (pure, no vLLM)."""

import pytest

from vllm_ampere.quant.layers import INT8_LINEAR_SUFFIXES, LayerKind, Scheme, classify


@pytest.mark.parametrize("prefix", [
    "model.layers.0.attn.fused_wqa_wkv", "model.layers.7.attn.wq_b", "model.layers.3.attn.wo_a",
    "model.layers.42.attn.wo_b", "model.layers.2.attn.indexer.wq_b",
    "model.layers.5.ffn.shared_experts.gate_up_proj", "model.layers.5.ffn.shared_experts.down_proj",
    "model.layers.43.e_proj", "model.layers.43.h_proj",
])
def test_int8_linears(prefix):
    assert classify(LayerKind.LINEAR, prefix) is Scheme.LINEAR_W8A16


@pytest.mark.parametrize("prefix", [
    "model.layers.0.ffn.gate",  # router: BF16
    "model.layers.2.attn.indexer.weights_proj",
    # BF16 in DeepSeek-V4 checkpoints; vLLM builds them with quant_config=None
    "model.layers.2.attn.compressor.fused_wkv_wgate", "model.layers.2.attn.indexer.compressor.fused_wkv_wgate",
    "lm_head", "model.embed_tokens",
    "model.layers.0.attn.wo_b_extra",  # a suffix match must be a whole component
    "model.layers.0.attn.xwq_b",
])
def test_unquantized_linears(prefix):
    assert classify(LayerKind.LINEAR, prefix) is Scheme.UNQUANTIZED


def test_routed_experts_and_others():
    assert classify(LayerKind.ROUTED_EXPERTS, "model.layers.9.ffn.experts") is Scheme.EXPERTS_W4A16
    assert classify(LayerKind.OTHER, "model.layers.9.attn.wq_b") is Scheme.UNQUANTIZED


def test_suffix_table_has_no_duplicates():
    assert len(set(INT8_LINEAR_SUFFIXES)) == len(INT8_LINEAR_SUFFIXES)

"""DeepSeek-V4-Flash's dimensions and the bytes each part takes in a dsv4_int checkpoint.

The dimensions are those of the published DeepSeek-V4-Flash `config.json` (43 layers, hidden
4096, 64 heads of 512, compress_ratios 0,0 then 4/128 alternating). The tensor list per layer
follows the pinned vLLM's model (vllm/models/deepseek_v4/{attention,compressor}.py,
nvidia/model.py): what a stage holds is what vLLM allocates for its layers, in the dtypes the
dsv4_int format stores (SPEC-dsv4_int.md section 2): routed experts INT4 + BF16 group scales
(group 32), the other FP8 weights INT8 + one BF16 scale per output row, the rest unchanged
(the compressors' projections among them: BF16 in the checkpoint, built unquantized by vLLM).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path

BF16, FP32, INT32 = 2, 4, 4


def int8_linear(n: int, k: int) -> int:
    """INT8 W8A16 `channel`: U8 [N, K] + BF16 scale [N]."""
    return n * k + BF16 * n


def int4_linear(n: int, k: int, group: int = 32) -> int:
    """INT4 W4A16: two codes per byte [N, K/2] + BF16 scale [N, K/group]."""
    return n * k // 2 + BF16 * n * (k // group)


def compressor_coff(ratio: int) -> int:
    """State sets of a ratio-r compressor: 2 where windows overlap (r = 4), else 1
    (vllm/models/deepseek_v4/compressor.py: coff = 1 + (compress_ratio == 4))."""
    return 2 if ratio == 4 else 1


@dataclass(frozen=True)
class ModelDims:
    num_hidden_layers: int = 43
    hidden_size: int = 4096
    vocab_size: int = 129280
    num_attention_heads: int = 64
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 2048
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    hc_mult: int = 4
    sliding_window: int = 128
    num_hash_layers: int = 3
    # One entry per layer (+ a trailing MTP entry in the published config, ignored here).
    compress_ratios: tuple[int, ...] = (0, 0) + (4, 128) * 20 + (4, 0)

    @classmethod
    def from_config(cls, config: dict) -> ModelDims:
        """From a checkpoint's config.json dict; missing keys keep Flash's values."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in config.items() if k in known}
        if "compress_ratios" in values:
            values["compress_ratios"] = tuple(values["compress_ratios"])
        dims = cls(**values)
        if len(dims.compress_ratios) < dims.num_hidden_layers:
            raise ValueError(
                f"compress_ratios has {len(dims.compress_ratios)} entries, "
                f"fewer than num_hidden_layers={dims.num_hidden_layers}"
            )
        bad = sorted({r for r in dims.ratios if r not in (0, 1, 4, 128)})
        if bad:
            raise ValueError(f"compress_ratios has values {bad}; vLLM 0.32.0 supports 0/1, 4, 128")
        return dims

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> ModelDims:
        config_path = Path(path) / "config.json"
        try:
            return cls.from_config(json.loads(config_path.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{config_path}: cannot read the model config: {e}") from e

    @cached_property
    def ratios(self) -> tuple[int, ...]:
        """Compress ratio of each decoder layer as vLLM uses it (0 and 1 both mean SWA only)."""
        return tuple(max(1, r) for r in self.compress_ratios[: self.num_hidden_layers])


def layer_weight_bytes(dims: ModelDims, layer: int) -> int:
    """Bytes of decoder layer `layer` on the GPU in dsv4_int."""
    h, r = dims.hidden_size, dims.ratios[layer]
    heads_x_dim = dims.num_attention_heads * dims.head_dim
    attn = (
        int8_linear(dims.q_lora_rank, h)  # wq_a (fused_wqa_wkv)
        + int8_linear(dims.head_dim, h)  # wkv (fused_wqa_wkv)
        + int8_linear(heads_x_dim, dims.q_lora_rank)  # wq_b
        + int8_linear(dims.o_groups * dims.o_lora_rank, heads_x_dim // dims.o_groups)  # wo_a
        + int8_linear(h, dims.o_groups * dims.o_lora_rank)  # wo_b
        + BF16 * (dims.q_lora_rank + dims.head_dim)  # q_norm, kv_norm
        + FP32 * dims.num_attention_heads  # attn_sink
    )
    if r > 1:  # compressor: fused_wkv_wgate (BF16: vLLM builds it unquantized), ape (fp32), norm
        coff = compressor_coff(r)
        attn += BF16 * 2 * coff * dims.head_dim * h
        attn += FP32 * r * coff * dims.head_dim + BF16 * dims.head_dim
    if r == 4:  # indexer: wq_b, weights_proj (BF16), its own compressor (head 128, overlap, BF16)
        ih = dims.index_head_dim
        attn += int8_linear(dims.index_n_heads * ih, dims.q_lora_rank)
        attn += BF16 * dims.index_n_heads * h
        attn += BF16 * 2 * 2 * ih * h + FP32 * r * 2 * ih + BF16 * ih
    inter = dims.moe_intermediate_size
    experts = dims.n_routed_experts * (2 * int4_linear(inter, h) + int4_linear(h, inter))
    shared_inter = inter * dims.n_shared_experts
    shared = 2 * int8_linear(shared_inter, h) + int8_linear(h, shared_inter)
    gate = BF16 * dims.n_routed_experts * h
    if layer < dims.num_hash_layers:  # hash routing table [vocab, top-k] int32
        gate += INT32 * dims.vocab_size * dims.num_experts_per_tok
    else:  # e_score_correction_bias
        gate += FP32 * dims.n_routed_experts
    mix_hc = (2 + dims.hc_mult) * dims.hc_mult
    hc = 2 * FP32 * (mix_hc * dims.hc_mult * h + mix_hc + 3)  # hc_{attn,ffn}_{fn,base,scale}
    norms = 2 * BF16 * h
    return attn + experts + shared + gate + hc + norms


def largest_expert_tensor_bytes(dims: ModelDims) -> int:
    """One layer's w13 (gate+up of all routed experts): the biggest tensor a worker repacks."""
    return dims.n_routed_experts * 2 * int4_linear(dims.moe_intermediate_size, dims.hidden_size)


def embedding_bytes(dims: ModelDims) -> int:
    """First stage only: VocabParallelEmbedding, BF16."""
    return BF16 * dims.vocab_size * dims.hidden_size


def head_bytes(dims: ModelDims) -> int:
    """Last stage only: lm_head (BF16), final norm, hc_head_{fn,base,scale}."""
    h = dims.hidden_size
    hc = FP32 * (dims.hc_mult * dims.hc_mult * h + dims.hc_mult + 1)
    return BF16 * dims.vocab_size * h + BF16 * h + hc

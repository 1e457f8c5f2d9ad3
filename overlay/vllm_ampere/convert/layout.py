"""Which tensors a native DeepSeek-V4-Flash checkpoint holds, and what dsv4_int writes for each.

Derived from config.json the way the pinned vLLM builds the model (vllm/models/deepseek_v4:
attention.py, compressor.py, */model.py, nvidia/mtp.py) and checked against the published
DeepSeek-V4-Flash tensor list: compress_ratios has one entry per layer plus one per MTP layer;
ratio 4 layers have a compressor with overlap (2x width) and an indexer, ratio 128 layers a
plain compressor; the first num_hash_layers layers route by token id (`ffn.gate.tid2eid`, no
`ffn.gate.bias`); compressor projections are BF16 (vLLM builds them with quant_config=None).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from .codecs import MXFP4_GROUP, block_grid

Kind = Literal["expert", "expert_scale", "fp8", "fp8_scale", "keep"]
Shape = tuple[int, ...]


@dataclass(frozen=True)
class NativeTensor:
    name: str
    kind: Kind
    dtypes: tuple[str, ...]  # accepted safetensors dtypes (the first is what the generator writes)
    shape: Shape

    @property
    def weight_name(self) -> str:
        """The `.weight` a scale belongs to (itself for weights)."""
        return self.name[: -len(".scale")] + ".weight" if self.kind.endswith("_scale") else self.name

    @property
    def scale_name(self) -> str:
        return self.name[: -len(".weight")] + ".scale"


class _Builder:
    def __init__(self) -> None:
        self.out: dict[str, NativeTensor] = {}

    def keep(self, name: str, dtype: str | tuple[str, ...], *shape: int) -> None:
        dtypes = (dtype,) if isinstance(dtype, str) else dtype
        self.out[name] = NativeTensor(name, "keep", dtypes, shape)

    def fp8(self, prefix: str, n: int, k: int) -> None:
        self.out[f"{prefix}.weight"] = NativeTensor(f"{prefix}.weight", "fp8", ("F8_E4M3",), (n, k))
        self.out[f"{prefix}.scale"] = NativeTensor(f"{prefix}.scale", "fp8_scale", ("F8_E8M0",), block_grid(n, k))

    def expert(self, prefix: str, n: int, k: int) -> None:
        self.out[f"{prefix}.weight"] = NativeTensor(f"{prefix}.weight", "expert", ("I8",), (n, k // 2))
        self.out[f"{prefix}.scale"] = NativeTensor(f"{prefix}.scale", "expert_scale", ("F8_E8M0",), (n, k // MXFP4_GROUP))


def native_tensors(cfg: dict) -> dict[str, NativeTensor]:
    """Every tensor of the native checkpoint described by config.json `cfg`, by name."""
    b = _Builder()
    hidden, vocab = cfg["hidden_size"], cfg["vocab_size"]
    hc = cfg["hc_mult"]
    b.keep("embed.weight", "BF16", vocab, hidden)
    b.keep("head.weight", "BF16", vocab, hidden)
    b.keep("norm.weight", "BF16", hidden)
    _hc_head(b, "", hc, hidden)
    n_layers = cfg["num_hidden_layers"]
    for i in range(n_layers):
        _block(b, cfg, f"layers.{i}.", i)
    for j in range(cfg.get("num_nextn_predict_layers", 0)):
        p = f"mtp.{j}."
        _block(b, cfg, p, n_layers + j)
        b.fp8(p + "e_proj", hidden, hidden)
        b.fp8(p + "h_proj", hidden, hidden)
        for norm in ("enorm", "hnorm", "norm"):
            b.keep(f"{p}{norm}.weight", "BF16", hidden)
        _hc_head(b, p, hc, hidden)
    return b.out


def _hc_head(b: _Builder, p: str, hc: int, hidden: int) -> None:
    b.keep(p + "hc_head_fn", "F32", hc, hc * hidden)
    b.keep(p + "hc_head_base", "F32", hc)
    b.keep(p + "hc_head_scale", "F32", 1)


def _block(b: _Builder, cfg: dict, p: str, index: int) -> None:
    hidden, heads, head_dim = cfg["hidden_size"], cfg["num_attention_heads"], cfg["head_dim"]
    q_rank, o_rank, o_groups = cfg["q_lora_rank"], cfg["o_lora_rank"], cfg["o_groups"]
    ratios = cfg["compress_ratios"]
    ratio = ratios[index] if index < len(ratios) else 0
    a = p + "attn."
    b.keep(a + "attn_sink", "F32", heads)
    b.keep(a + "q_norm.weight", "BF16", q_rank)
    b.keep(a + "kv_norm.weight", "BF16", head_dim)
    b.fp8(a + "wq_a", q_rank, hidden)
    b.fp8(a + "wkv", head_dim, hidden)
    b.fp8(a + "wq_b", heads * head_dim, q_rank)
    b.fp8(a + "wo_a", o_groups * o_rank, heads * head_dim // o_groups)
    b.fp8(a + "wo_b", hidden, o_groups * o_rank)
    if ratio > 1:
        _compressor(b, a + "compressor.", ratio, head_dim, hidden)
    if ratio == 4:
        idx_heads, idx_dim = cfg["index_n_heads"], cfg["index_head_dim"]
        b.fp8(a + "indexer.wq_b", idx_heads * idx_dim, q_rank)
        b.keep(a + "indexer.weights_proj.weight", "BF16", idx_heads, hidden)
        _compressor(b, a + "indexer.compressor.", ratio, idx_dim, hidden)
    b.keep(p + "attn_norm.weight", "BF16", hidden)
    b.keep(p + "ffn_norm.weight", "BF16", hidden)
    mix = (2 + cfg["hc_mult"]) * cfg["hc_mult"]
    for part in ("attn", "ffn"):
        b.keep(f"{p}hc_{part}_fn", "F32", mix, cfg["hc_mult"] * hidden)
        b.keep(f"{p}hc_{part}_base", "F32", mix)
        b.keep(f"{p}hc_{part}_scale", "F32", 3)
    f = p + "ffn."
    experts, inter = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
    b.keep(f + "gate.weight", "BF16", experts, hidden)
    if index < cfg.get("num_hash_layers", 0):
        b.keep(f + "gate.tid2eid", ("I64", "I32"), cfg["vocab_size"], cfg["num_experts_per_tok"])
    else:
        b.keep(f + "gate.bias", "F32", experts)
    for e in range(experts):
        b.expert(f"{f}experts.{e}.w1", inter, hidden)
        b.expert(f"{f}experts.{e}.w3", inter, hidden)
        b.expert(f"{f}experts.{e}.w2", hidden, inter)
    shared = inter * cfg.get("n_shared_experts", 1)
    b.fp8(f + "shared_experts.w1", shared, hidden)
    b.fp8(f + "shared_experts.w3", shared, hidden)
    b.fp8(f + "shared_experts.w2", hidden, shared)


def _compressor(b: _Builder, p: str, ratio: int, head_dim: int, hidden: int) -> None:
    width = (2 if ratio == 4 else 1) * head_dim  # ratio 4 compresses overlapping windows
    b.keep(p + "ape", "F32", ratio, width)
    b.keep(p + "wkv.weight", "BF16", width, hidden)
    b.keep(p + "wgate.weight", "BF16", width, hidden)
    b.keep(p + "norm.weight", "BF16", head_dim)


def output_spec(name: str, tensors: dict[str, NativeTensor], dense: str, source_dtype: str) -> tuple[str, Shape]:
    """(dtype, shape) that dsv4_int writes for native tensor `name` (SPEC section 2); a tensor
    kept unchanged keeps the dtype it has in the source (`source_dtype`: tid2eid is I64 or I32)."""
    t = tensors[name]
    if t.kind == "expert":
        return "I8", t.shape
    if t.kind == "expert_scale":
        return "BF16", t.shape
    if t.kind == "fp8":
        return ("U8" if dense == "channel" else "I8"), t.shape
    if t.kind == "fp8_scale":
        n, k = tensors[t.weight_name].shape
        return "BF16", ((n,) if dense == "channel" else block_grid(n, k))
    return source_dtype, t.shape


_CLASS_RE = re.compile(r"^(layers|mtp)\.\d+\.|\.weight$")


def tensor_class(name: str) -> str:
    """Quality-report class: the name without layer/expert indices, e.g. `ffn.experts.w1`."""
    return re.sub(r"experts\.\d+\.", "experts.", _CLASS_RE.sub("", name))


def bf16_linear_patterns(tensors: dict[str, NativeTensor]) -> list[str]:
    """Glob patterns of the 2-D BF16 projections dsv4_int deliberately leaves in BF16."""
    pats = set()
    for t in tensors.values():
        if t.kind == "keep" and len(t.shape) == 2 and t.dtypes[0] == "BF16":
            pats.add(re.sub(r"^(layers|mtp)\.\d+\.", "*.", t.name))
    return sorted(pats)

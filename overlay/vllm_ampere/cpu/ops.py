"""Torch implementations of the `_C` ops DeepSeek-V4's CPU model calls, registered into
`torch.ops._C` only where the loaded kernel library lacks them.

vLLM's CPU wheel ships three kernel libraries and `CpuPlatform.import_kernels` loads one:
`_C` (AVX-512 BF16), `_C_AVX512`, or `_C_AVX2` on CPUs without AVX-512. The DeepSeek-V4 kernels
(csrc/cpu/sgl-kernels/) are compiled only into `_C`, so on an AVX2 CPU `torch.ops._C.bmm_cpu`
and the rest do not exist and the first forward fails. vLLM looks every one of them up at call
time (`torch.ops._C.<name>` directly or through the `vllm._custom_ops` wrappers), so defining
them in the `_C` namespace after the library loaded is enough; where the library has an op it is
left alone. Schemas are the stock ones (read from the AVX-512 library) so callers see no
difference. The math lives in the reference modules named per op; this module adapts them to
the stock in/out conventions and supplies fake (meta) versions for torch.compile tracing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from vllm_ampere.attention import compressor, o_proj
from vllm_ampere.attention.reference import compressor_state, indexer_fp8, sparse_mla, swa_insert
from vllm_ampere.cpu import gemm, mhc

# An op every vLLM CPU kernel library defines: present once import_kernels has loaded one.
LIBRARY_PROBE = "rms_norm"
# convert_weight_packed's layout is read only by bmm_cpu (vllm_ampere.cpu.gemm): all or none.
PACKED_PAIR = ("convert_weight_packed", "bmm_cpu")


def flash_mla_with_kvcache(out: torch.Tensor, q: torch.Tensor, window_cache_2d: torch.Tensor,
                           window_slots: torch.Tensor, window_block_size: int, compressed_cache_2d: torch.Tensor,
                           compressed_slots: torch.Tensor, compressed_block_size: int, attn_sink: torch.Tensor,
                           scale: float) -> None:
    """Sparse decode of q [T, H, 512] over the SWA window slots (first stream) and the
    compressed slots (extra stream, absent when it has no columns) of two fp8_ds_mla caches;
    slots are global (block * block_size + offset), -1 or out of range = skip."""
    t, h, d = q.shape
    extra = compressed_slots.shape[-1] > 0
    o, _ = sparse_mla.flash_mla_sparse_decode_ref(
        q.view(t, 1, h, d), window_cache_2d, window_slots.view(t, 1, -1), None, attn_sink, scale,
        compressed_cache_2d if extra else None, compressed_slots.view(t, 1, -1) if extra else None, None,
        block_size=window_block_size, extra_block_size=compressed_block_size)
    out.copy_(o.view(t, h, d))


def fused_indexer_q_rope_quant(positions, index_q, cos_sin_cache, index_q_fp8, index_weights, softmax_scale,
                               head_scale, index_weights_out) -> None:
    q, w = indexer_fp8.indexer_q_fp8(positions, index_q, cos_sin_cache, index_weights, softmax_scale, head_scale)
    index_q_fp8.copy_(q)
    index_weights_out.copy_(w)


def inverse_gptj_rope_o_proj(o: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                             rope_dim: int) -> torch.Tensor:
    """The stock op returns fp32 [T, H, D] (its caller casts to bf16 after regrouping)."""
    return o_proj.inverse_rope_o(o.to(torch.float32), positions, cos_sin_cache, rope_dim)


def _none(*_args, **_kwargs) -> None:
    return None


@dataclass(frozen=True)
class TorchOp:
    schema: str  # the stock schema after the op name
    impl: Callable
    fake: Callable  # shape/dtype-only version for torch.compile


OPS: dict[str, TorchOp] = {
    "convert_weight_packed": TorchOp("(Tensor weight) -> Tensor", gemm.convert_weight_packed,
                                     lambda w: torch.empty_like(w, memory_format=torch.contiguous_format)),
    "bmm_cpu": TorchOp("(Tensor(a!) out, Tensor mat1, Tensor mat2, bool is_vnni, Tensor? scale) -> ()",
                       gemm.bmm, _none),
    "hc_pre_fused_cpu": TorchOp(
        "(Tensor x, Tensor hc_fn, Tensor hc_scale, Tensor hc_base, int hc_mult, int sinkhorn_iters, "
        "float rms_eps, float hc_eps) -> (Tensor, Tensor, Tensor)", mhc.hc_pre,
        lambda x, fn, s, b, hc, it, re, he: (x.new_empty((x.shape[0], x.shape[2])),
                                             x.new_empty((x.shape[0], hc), dtype=torch.float32),
                                             x.new_empty((x.shape[0], hc, hc), dtype=torch.float32))),
    "hc_post_fused_cpu": TorchOp("(Tensor x, Tensor residual, Tensor post, Tensor comb) -> Tensor", mhc.hc_post,
                                 lambda x, res, post, comb: torch.empty_like(res)),
    "hc_head_fused_cpu": TorchOp(
        "(Tensor x, Tensor hc_fn, Tensor hc_scale, Tensor hc_base, float hc_eps, float norm_eps) -> Tensor",
        mhc.hc_head, lambda x, fn, s, b, he, ne: x.new_empty((x.shape[0], x.shape[2]))),
    "fused_qnorm_rope_kv_insert_cpu": TorchOp(
        "(Tensor q, Tensor kv, Tensor positions, Tensor(a!) swa_kv_cache_2d, Tensor slot_mapping, "
        "Tensor cos_sin_cache, int q_head_padded, float eps, int cache_block_size) -> Tensor",
        swa_insert.qnorm_rope_kv_insert,
        lambda q, kv, pos, cache, slots, cs, padded, eps, bs: q.new_empty((q.shape[0], padded, q.shape[2]))),
    "save_partial_states_cpu": TorchOp(
        "(Tensor kv, Tensor score, Tensor ape, Tensor positions, Tensor(a!) state_cache, Tensor slot_mapping) -> ()",
        compressor_state.save_partial_states, _none),
    "compress_norm_rope_store_cpu": TorchOp(
        "(Tensor state_cache, Tensor gather_slots, Tensor positions, Tensor kv_slot_mapping, Tensor rms_norm_weight, "
        "float rms_norm_eps, Tensor cos_sin_cache, Tensor(a!) kv_cache_2d, int kv_cache_block_size, "
        "int compress_ratio) -> ()", compressor.compress_norm_rope_store, _none),
    "compress_norm_rope_store_indexer_cpu": TorchOp(
        "(Tensor state_cache, Tensor gather_slots, Tensor positions, Tensor kv_slot_mapping, Tensor rms_norm_weight, "
        "float rms_norm_eps, Tensor cos_sin_cache, Tensor(a!) kv_cache_2d, int kv_cache_block_size, "
        "int compress_ratio) -> ()", compressor.compress_norm_rope_store, _none),
    "flash_mla_with_kvcache_cpu": TorchOp(
        "(Tensor(a!) out, Tensor q, Tensor window_cache_2d, Tensor window_slots, int window_block_size, "
        "Tensor compressed_cache_2d, Tensor compressed_slots, int compressed_block_size, Tensor attn_sink, "
        "float scale) -> ()", flash_mla_with_kvcache, _none),
    "inverse_gptj_rope_o_proj_cpu": TorchOp(
        "(Tensor o, Tensor positions, Tensor cos_sin_cache, int rope_dim) -> Tensor", inverse_gptj_rope_o_proj,
        lambda o, pos, cs, rope: torch.empty_like(o, dtype=torch.float32)),
    "fused_indexer_q_rope_quant_cpu": TorchOp(
        "(Tensor positions, Tensor index_q, Tensor index_q_cos_sin_cache, Tensor(a!) index_q_fp8, "
        "Tensor index_weights, float index_weights_softmax_scale, float index_weights_head_scale, "
        "Tensor(b!) index_weights_out) -> ()", fused_indexer_q_rope_quant, _none),
    "fp8_paged_mqa_logits_cpu": TorchOp(
        "(Tensor q_fp8, Tensor kvcache_fp8, Tensor weight, Tensor seq_lens, Tensor page_table, int block_size, "
        "int max_seq_len) -> Tensor", indexer_fp8.paged_mqa_logits,
        lambda q, kv, w, lens, table, bs, n: q.new_empty((q.shape[0], n), dtype=torch.float32)),
    "topk_transform_512_cpu": TorchOp(
        "(Tensor scores, Tensor seq_lens, Tensor page_tables, Tensor(a!) out_page_indices, int page_size, "
        "Tensor(b!)? out_raw_indices) -> ()", indexer_fp8.topk_transform_512, _none),
}

_LIBRARIES: dict[str, torch.library.Library] = {}  # kept alive: dropping one unregisters its ops


def kernel_library_loaded(namespace: str = "_C") -> bool:
    return hasattr(getattr(torch.ops, namespace), LIBRARY_PROBE)


def missing_ops(namespace: str = "_C") -> list[str]:
    ns = getattr(torch.ops, namespace)
    return [name for name in OPS if not hasattr(ns, name)]


def register_missing_ops(namespace: str = "_C") -> list[str]:
    """Define every op of OPS that `torch.ops.<namespace>` lacks, with its CPU implementation
    and fake; return their names. Idempotent. Call it only after the kernel library loaded:
    loading a library that defines an op already defined here would fail."""
    missing = missing_ops(namespace)
    pair_missing = [n for n in PACKED_PAIR if n in missing]
    if pair_missing and len(pair_missing) != len(PACKED_PAIR):
        raise RuntimeError(
            f"torch.ops.{namespace} has {set(PACKED_PAIR) - set(pair_missing)} but not {pair_missing}: the stock "
            "VNNI-packed weight layout would meet our unpacked bmm (vllm_ampere/cpu/gemm.py)")
    if not missing:
        return []
    lib = _LIBRARIES.get(namespace)
    if lib is None:
        lib = _LIBRARIES[namespace] = torch.library.Library(namespace, "FRAGMENT")
    for name in missing:
        op = OPS[name]
        lib.define(name + op.schema)
        lib.impl(name, op.impl, "CPU")
        # vllm._custom_ops registers fakes for some of these when it finds the op at import;
        # torch lets the later registration replace the earlier (allow_override), same shapes.
        torch.library.register_fake(f"{namespace}::{name}", op.fake, lib=lib)
    return missing

"""DeepseekCompressor.forward on sm80/sm86: the stock state write, our torch store step.

Mirrors vLLM 0.32.0's `DeepseekCompressor.forward` (vllm/models/deepseek_v4/compressor.py): the
kv / score split and `_SAVE_PARTIAL_STATES_KERNEL` (a Triton kernel with no FP8, run as stock),
then the window gather of the CPU port (`DeepseekV4CPUCompressor.forward`) and
vllm_ampere.attention.compressor.compress_norm_rope_store instead of the CuTe DSL / e4m3 Triton
store kernels.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from vllm.forward_context import get_forward_context
from vllm.models.deepseek_v4.common.ops.save_partial_states import _SAVE_PARTIAL_STATES_KERNEL
from vllm.models.deepseek_v4.cpu.cpu_utils import map_local_to_global_slots_cpu

from vllm_ampere.attention.compressor import compress_norm_rope_store


def compressor_forward_sm8x(self, kv_score: torch.Tensor, positions: torch.Tensor, rotary_emb) -> None:
    if self.use_fp4_cache:
        raise NotImplementedError("the MXFP4 indexer cache is Blackwell-only; sm8x uses the FP8 one")
    kv, score = kv_score.split([self.coff * self.head_dim, self.coff * self.head_dim], dim=-1)
    attn_metadata = get_forward_context().attn_metadata
    if not isinstance(attn_metadata, dict):  # profiling / dummy run
        return
    state_metadata = attn_metadata[self.state_cache.prefix]
    slot_mapping = state_metadata.slot_mapping
    num_actual = slot_mapping.shape[0]
    state_cache = self.state_cache.kv_cache
    _SAVE_PARTIAL_STATES_KERNEL(
        kv=kv, score=score, ape=self.ape, positions=positions, state_cache=state_cache,
        slot_mapping=slot_mapping, block_size=state_metadata.block_size,
        state_width=state_cache.shape[-1] // 2, compress_ratio=self.compress_ratio,
        pdl_kwargs={"launch_pdl": False})

    k_cache_metadata = cast(Any, attn_metadata[self.k_cache_prefix])
    kv_cache = self._static_forward_context[self.k_cache_prefix].kv_cache
    if kv_cache.dtype != torch.uint8:
        raise NotImplementedError(
            f"sm8x DeepSeek-V4 stores compressed KV in the fp8_ds_mla / FP8 indexer layouts; got a {kv_cache.dtype} cache")
    window = (1 + self.overlap) * self.compress_ratio
    pos = positions[:num_actual]
    win_local = pos.unsqueeze(-1) - window + 1 + torch.arange(window, device=pos.device)
    gather_slots = map_local_to_global_slots_cpu(
        win_local, state_metadata.token_to_req_indices[:num_actual], state_metadata.block_table,
        state_metadata.block_size)
    compress_norm_rope_store(state_cache, gather_slots, pos, k_cache_metadata.slot_mapping[:num_actual],
                             self.norm.weight, self.rms_norm_eps, rotary_emb.cos_sin_cache, kv_cache,
                             kv_cache.shape[1], self.compress_ratio)

"""DeepSeek-V4 sparse-MLA attention on sm80/sm86 (A100, RTX 3090), for vLLM 0.32.0.

Stock vLLM builds DeepSeek-V4 attention from `DeepseekV4FlashMLAAttention`
(vllm/models/deepseek_v4/nvidia/flashmla.py), whose backend accepts capability 9 and 10 only
and whose kernels are FlashMLA sm90a/sm100 builds. `DeepseekV4AmpereAttention` keeps the stock
layer (projections, caches, metadata, prefill chunking) and changes what cannot run on sm8x:

- backends that declare capability 8.x, with an SWA metadata builder that does not call the
  FlashMLA tile-scheduler planner (our decode has a fixed split plan, see flashmla_config.h);
- decode / prefill / prefill KV gather: routed on sm8x to vllm_ampere.ops.flashmla and
  attention/kv_gather.py by the patches attn_flashmla_*;
- `_o_proj`: attention/o_proj.py instead of DeepGEMM's FP8 einsum;
- the attention input preparation (compressor, indexer query) runs in the eager region;
- no full CUDA graphs: the sm8x compressor and indexer are torch code that reads the GPU from
  the host and has data-dependent shapes (nonzero, .cpu(), int()), which stream capture refuses.
  Our builders declare AttentionCGSupport.NEVER. For DeepSeek-V4, vLLM 0.32.0 turns on its
  breakable CUDA graphs, which set compilation mode NONE, so the default FULL_AND_PIECEWISE
  resolves to NONE (CompilationConfig.resolve_cudagraph_mode_and_sizes): decode runs eagerly.
  An explicit PIECEWISE is kept, and would capture everything outside the wide eager region
  (below) in breakable graphs; not yet run on a GPU.

patches/attn_select_dsv4_class.py makes the model pick this class on sm8x and refuse below
sm_80 with a message naming the GPU.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch

from vllm.models.deepseek_v4.nvidia.flashmla import (
    DeepseekSparseSWAFlashMLABackend,
    DeepseekSparseSWAFlashMLAMetadataBuilder,
    DeepseekV4FlashMLAAttention,
)
from vllm.models.deepseek_v4.sparse_mla import DeepseekV4FlashMLABackend, DeepseekV4FlashMLAMetadataBuilder
from vllm.platforms.interface import DeviceCapability
from vllm.v1.attention.backend import AttentionCGSupport
from vllm.v1.attention.backends.mla.sparse_swa import (
    _LAYER_TYPE_C1A,
    _LAYER_TYPE_C2A,
    _LAYER_TYPE_C4A,
    _LAYER_TYPE_C128A,
    _LAYER_TYPE_SWAONLY,
)

from vllm_ampere.attention.o_proj import grouped_wo_a, inverse_rope_o

AMPERE_MAJOR = 8
# The keys the stock build_tile_scheduler returns (vllm/v1/attention/backends/mla/sparse_swa.py).
_LAYER_TYPES = (_LAYER_TYPE_SWAONLY, _LAYER_TYPE_C4A, _LAYER_TYPE_C128A, _LAYER_TYPE_C1A, _LAYER_TYPE_C2A)


class UnsupportedGPUError(RuntimeError):
    """DeepSeek-V4 attention asked for on a GPU below sm_80."""


def is_ampere_family(capability: DeviceCapability | None) -> bool:
    """sm_80 / sm_86 (and sm_87 / sm_89, which run the same sm_80 code)."""
    return capability is not None and capability.major == AMPERE_MAJOR


def platform_on_ampere() -> bool:
    """Whether this process's vLLM platform is an sm8x CUDA GPU (for code that has no tensor)."""
    from vllm.platforms import current_platform

    return current_platform.is_cuda() and is_ampere_family(current_platform.get_device_capability())


def check_capability(capability: DeviceCapability | None) -> None:
    if capability is not None and capability.major < AMPERE_MAJOR:
        raise UnsupportedGPUError(
            f"DeepSeek-V4 attention needs an sm_80 or newer GPU (A100, RTX 3090, ...); this GPU is "
            f"sm_{capability.major}{capability.minor}: no bf16 tensor cores (mma.m16n8k16.bf16) "
            "and no cp.async, which both the stock FlashMLA kernels and vllm_ampere's need")


class DeepseekV4AmpereMetadataBuilder(DeepseekV4FlashMLAMetadataBuilder):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER  # see the module doc


class DeepseekV4AmpereSparseBackend(DeepseekV4FlashMLABackend):
    @staticmethod
    def get_builder_cls() -> type[DeepseekV4AmpereMetadataBuilder]:
        return DeepseekV4AmpereMetadataBuilder

    @staticmethod
    def get_name() -> str:
        # Not FLASHMLA_SPARSE_DSV4: stock warmups keyed on that name compile Hopper kernels.
        return "VLLM_AMPERE_SPARSE_DSV4"

    @classmethod
    def supports_compute_capability(cls, capability: DeviceCapability) -> bool:
        return is_ampere_family(capability)


@dataclass(frozen=True)
class FixedSplitPlan:
    """Stands where FlashMLA's FlashMLASchedMeta goes: our decode splits each query's index
    list into fixed 64-entry chunks, so there is nothing to plan per step."""

    layer_type: str


class DeepseekSparseSWAAmpereMetadataBuilder(DeepseekSparseSWAFlashMLAMetadataBuilder):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER  # see the module doc

    def build_tile_scheduler(self, num_decode_tokens: int) -> dict[str, FixedSplitPlan | None]:
        # Same keys and None-when-no-decodes contract as the stock method, without calling
        # FlashMLA's get_mla_metadata (missing or sm90-only in builds for Ampere).
        out: dict[str, FixedSplitPlan | None] = {k: None for k in _LAYER_TYPES}
        if num_decode_tokens:
            for layer_type in self._layer_types:
                out[layer_type] = FixedSplitPlan(layer_type)
        return out


class DeepseekSparseSWAAmpereBackend(DeepseekSparseSWAFlashMLABackend):
    @staticmethod
    def get_builder_cls() -> type[DeepseekSparseSWAAmpereMetadataBuilder]:
        return DeepseekSparseSWAAmpereMetadataBuilder

    @classmethod
    def supports_compute_capability(cls, capability: DeviceCapability) -> bool:
        return is_ampere_family(capability)


class DeepseekV4AmpereAttention(DeepseekV4FlashMLAAttention):
    """DeepSeek-V4 sparse MLA on sm80/sm86 (see the module docstring)."""

    backend_cls: ClassVar = DeepseekV4AmpereSparseBackend
    swa_backend_cls: ClassVar = DeepseekSparseSWAAmpereBackend

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # The wide eager region (stock uses it for the V1 model runner): the compressor and the
        # indexer query run in torch on sm8x, with data-dependent shapes a CUDA graph cannot hold.
        self._prepare_and_attn_fn = self._prepare_and_attn_eager

    def _o_proj(self, o: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        num_tokens = o.shape[0]
        x = inverse_rope_o(o, positions[:num_tokens], self.rotary_emb.cos_sin_cache, self.rope_head_dim)
        x = x.reshape(num_tokens, self.n_local_groups, -1)
        z = grouped_wo_a(self.wo_a, x, self.n_local_groups, self.o_lora_rank)
        return self.wo_b(z.to(o.dtype).flatten(1))


@functools.cache
def _device_is_ampere(index: int) -> bool:
    major, minor = torch.cuda.get_device_capability(index)
    return is_ampere_family(DeviceCapability(major, minor))


def tensor_on_ampere(t: torch.Tensor) -> bool:
    """Whether `t` lives on an sm8x CUDA GPU (the patches' routing test; cached per device)."""
    return t.is_cuda and _device_is_ampere(t.device.index if t.device.index is not None else torch.cuda.current_device())

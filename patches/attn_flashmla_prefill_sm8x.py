"""Route DeepSeek-V4 sparse prefill to vllm_ampere's sm80 kernel on sm8x GPUs."""

from __future__ import annotations

from vllm_ampere.patches._route_sm8x import route_on_ampere
from vllm_ampere.patching import Patch

PATCH = Patch(
    name="attn_flashmla_prefill_sm8x",
    target="vllm.models.deepseek_v4.nvidia.flashmla:flash_mla_sparse_fwd",
    # Bound to FlashMLA's function in CUDA builds and to a raising stub elsewhere: not checked.
    signature="",
    why="DeepseekV4FlashMLAAttention._forward_prefill calls FlashMLA's sparse prefill, built "
    "for sm90a/sm100 only.",
    how="When q is on an sm8x GPU, calls vllm_ampere.ops.flashmla.flash_mla_sparse_fwd (same "
    "arguments, out= included); otherwise the stock function.",
    vllm_checked="0.32.0",
    processes=("workers",),
    remove_when="vLLM's FlashMLA build includes sm80 sparse prefill.",
    replace=route_on_ampere("flash_mla_sparse_fwd"),
)

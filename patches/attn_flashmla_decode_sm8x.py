"""Route DeepSeek-V4 sparse decode to vllm_ampere's sm80 kernel on sm8x GPUs."""

from __future__ import annotations

from vllm_ampere.patches._route_sm8x import route_on_ampere
from vllm_ampere.patching import Patch

PATCH = Patch(
    name="attn_flashmla_decode_sm8x",
    target="vllm.models.deepseek_v4.nvidia.flashmla:flash_mla_with_kvcache",
    # The name is bound to FlashMLA's interface function in CUDA builds of vLLM and to a
    # raising stub elsewhere, so the two builds disagree on the signature: not checked.
    signature="",
    why="DeepseekV4FlashMLAAttention._forward_decode calls FlashMLA's sparse fp8 decode, built "
    "for sm90a/sm100 only (and absent where vllm._flashmla_C is not built).",
    how="When q is on an sm8x GPU, calls vllm_ampere.ops.flashmla.flash_mla_with_kvcache (same "
    "arguments; the compiled sm80 kernel, or the fp32 torch reference if the extension is not "
    "built); otherwise the stock function.",
    vllm_checked="0.32.0",
    processes=("workers",),
    remove_when="vLLM's FlashMLA build includes sm80 sparse decode.",
    replace=route_on_ampere("flash_mla_with_kvcache"),
)

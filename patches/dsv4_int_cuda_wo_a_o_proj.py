"""Run a dsv4_int INT8 `wo_a` through the INT8 method in the FlashMLA attention's output projection."""

from vllm_ampere.patches._o_proj import o_proj_patch

PATCH = o_proj_patch(
    "dsv4_int_cuda_wo_a_o_proj", "vllm.models.deepseek_v4.nvidia.flashmla",
    "DeepseekV4FlashMLAAttention._o_proj (the CUDA attention vLLM picks on sm_90 and sm_100)")

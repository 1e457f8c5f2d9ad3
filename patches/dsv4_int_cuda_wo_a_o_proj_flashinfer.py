"""Run a dsv4_int INT8 `wo_a` through the INT8 method in the FlashInfer attention's output projection."""

from vllm_ampere.patches._o_proj import o_proj_patch

PATCH = o_proj_patch(
    "dsv4_int_cuda_wo_a_o_proj_flashinfer", "vllm.models.deepseek_v4.nvidia.flashinfer_sparse",
    "The FlashInfer sparse-MLA attention classes' _o_proj (vLLM's choice on sm_12x and with "
    "--attention-backend FLASHINFER_MLA_SPARSE_DSV4)")

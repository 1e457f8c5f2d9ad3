"""Run the token -> request mapping kernel in torch on vLLM's CPU build."""

from vllm_ampere.cpu import triton_unavailable
from vllm_ampere.cpu.metadata_kernels import kernel_override, token_request_mapping
from vllm_ampere.patching import Patch

PATCH = Patch(
    name="cpu_triton_token_request_mapping",
    target="vllm.v1.attention.ops.metadata:_token_request_mapping_kernel",
    signature="(query_start_loc, output, num_reqs, num_mapped, num_tokens)",
    why="CommonAttentionMetadata.token_to_req_indices() (every DeepSeek-V4 metadata builder) "
    "launches this Triton kernel; the CPU build has no Triton backend, so the first request "
    "fails with \"'function' object is not subscriptable\".",
    how="Replaces the kernel with vLLM's KernelOverride around "
    "vllm_ampere.cpu.metadata_kernels.token_request_mapping (searchsorted over "
    "query_start_loc, same outputs). Only where Triton is unavailable on the CPU platform.",
    vllm_checked="0.32.0",
    processes=("workers",),
    remove_when="vLLM's CPU platform registers a kernel override for it, or triton-cpu ships "
    "on PyPI.",
    replace=kernel_override(token_request_mapping),
    needed=triton_unavailable,
)

"""Run `compressed_slot_mapping`'s Triton kernel in torch on vLLM's CPU build."""

from vllm_ampere.cpu import triton_unavailable
from vllm_ampere.cpu.metadata_kernels import launcher_override, compressed_slot_mapping
from vllm_ampere.patching import Patch

PATCH = Patch(
    name="cpu_triton_compressed_slot_mapping",
    target="vllm.v1.attention.backends.mla.compressor_utils:CompressedSlotMappingKernel.__call__",
    signature="(self, compressed_slot_mapping: torch.Tensor, slot_mapping: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor, block_size: int, compress_ratio: int, dcp_world_size: int, cp_interleave: int) -> tuple[tuple[int, ...] | None, dict[str, typing.Any]] | tuple[tuple[int, ...] | None, dict[str, typing.Any], typing.Any]",
    why="get_compressed_slot_mapping() (the indexer and compressed-KV metadata builders) launches CompressedSlotMappingKernel; the CPU build has no Triton backend, so the launch fails.",
    how="The launcher calls vllm_ampere.cpu.metadata_kernels.compressed_slot_mapping (the kernel's outputs, "
    "computed in torch) instead of launching Triton. Only where Triton is unavailable on the "
    "CPU platform.",
    vllm_checked="0.32.0",
    processes=("workers",),
    remove_when="vLLM's CPU platform overrides this kernel, or triton-cpu ships on PyPI.",
    replace=launcher_override(compressed_slot_mapping),
    needed=triton_unavailable,
)

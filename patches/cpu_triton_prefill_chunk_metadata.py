"""Run `prefill_chunk_metadata`'s Triton kernel in torch on vLLM's CPU build."""

from vllm_ampere.cpu import triton_unavailable
from vllm_ampere.cpu.metadata_kernels import launcher_override, prefill_chunk_metadata
from vllm_ampere.patching import Patch

PATCH = Patch(
    name="cpu_triton_prefill_chunk_metadata",
    target="vllm.v1.attention.backends.mla.indexer:BuildPrefillChunkMetadataKernel.__call__",
    signature="(self, query_start_loc: torch.Tensor, uncompressed_seq_lens: torch.Tensor, cu_compressed_seq_lens: torch.Tensor, row_start_cu_compressed_seq_lens: torch.Tensor, token_to_seq: torch.Tensor, cu_compressed_seq_len_ks: torch.Tensor, cu_compressed_seq_len_ke: torch.Tensor, query_slice_start: int, query_slice_stop: int, DCP_RANK: int, DCP_WORLD: int, DCP_INTERLEAVE: int, *, num_reqs: int, COMPRESS_RATIO: int) -> tuple[tuple[int, ...] | None, dict[str, typing.Any]] | tuple[tuple[int, ...] | None, dict[str, typing.Any], typing.Any]",
    why="build_prefill_chunk_metadata() (the DeepSeek indexer's prefill path) launches BuildPrefillChunkMetadataKernel; the CPU build has no Triton backend, so the launch fails.",
    how="The launcher calls vllm_ampere.cpu.metadata_kernels.prefill_chunk_metadata (the kernel's outputs, "
    "computed in torch) instead of launching Triton. Only where Triton is unavailable on the "
    "CPU platform.",
    vllm_checked="0.32.0",
    processes=("workers",),
    remove_when="vLLM's CPU platform overrides this kernel, or triton-cpu ships on PyPI.",
    replace=launcher_override(prefill_chunk_metadata),
    needed=triton_unavailable,
)

"""Run the SWA window-slot kernel in torch on vLLM's CPU build."""

from vllm_ampere.cpu import triton_unavailable
from vllm_ampere.cpu.metadata_kernels import launcher_override, swa_indices_and_lens
from vllm_ampere.patching import Patch

PATCH = Patch(
    name="cpu_triton_swa_indices_and_lens",
    target="vllm.v1.attention.backends.mla.sparse_swa:ComputeSWAIndicesAndLensKernel.__call__",
    signature="(self, swa_indices: torch.Tensor, swa_lens: torch.Tensor, window_size: int, "
    "index_width: int, left_visible: torch.Tensor, right_visible: torch.Tensor, "
    "query_start_loc: torch.Tensor, seq_lens: torch.Tensor, token_to_req_indices: torch.Tensor, "
    "is_valid_token: torch.Tensor, block_table: torch.Tensor, block_size: int, "
    "replay_start: torch.Tensor, *, num_tokens: int, token_offset: int, has_image: bool = False) "
    "-> tuple[tuple[int, ...] | None, dict[str, typing.Any]] | tuple[tuple[int, ...] | None, "
    "dict[str, typing.Any], typing.Any]",
    why="DeepseekSparseSWAMetadataBuilder.build() launches _compute_swa_indices_and_lens_kernel "
    "for decode and prefill tokens; the CPU build has no Triton backend.",
    how="The launcher calls vllm_ampere.cpu.metadata_kernels.swa_indices_and_lens (the same "
    "window slots, lengths and -1 fills, in torch) instead of launching Triton. Only where "
    "Triton is unavailable on the CPU platform.",
    vllm_checked="0.32.0",
    processes=("workers",),
    remove_when="vLLM's CPU platform overrides this kernel, or triton-cpu ships on PyPI.",
    replace=launcher_override(swa_indices_and_lens),
    needed=triton_unavailable,
)

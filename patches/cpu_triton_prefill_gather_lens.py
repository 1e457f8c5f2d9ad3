"""Run the SWA prefill gather-length kernel in torch on vLLM's CPU build."""

from vllm_ampere.cpu import triton_unavailable
from vllm_ampere.cpu.metadata_kernels import launcher_override, prefill_gather_lens
from vllm_ampere.patching import Patch

PATCH = Patch(
    name="cpu_triton_prefill_gather_lens",
    target="vllm.v1.attention.backends.mla.sparse_swa:ComputePrefillMetadataKernel.__call__",
    signature="(self, prefill_gather_lens: torch.Tensor, seq_lens: torch.Tensor, "
    "query_start_loc: torch.Tensor, replay_start: torch.Tensor, num_prefills: int, "
    "num_decodes: int, window_size: int) -> tuple[tuple[int, ...] | None, dict[str, "
    "typing.Any]] | tuple[tuple[int, ...] | None, dict[str, typing.Any], typing.Any]",
    why="DeepseekSparseSWAMetadataBuilder._build_deepseek_v4_metadata launches "
    "ComputePrefillMetadataKernel for every batch with prefills; the CPU build has no Triton "
    "backend.",
    how="The launcher calls vllm_ampere.cpu.metadata_kernels.prefill_gather_lens (query length "
    "plus the visible window prefix, in torch) instead of launching Triton. Only where Triton "
    "is unavailable on the CPU platform.",
    vllm_checked="0.32.0",
    processes=("workers",),
    remove_when="vLLM's CPU platform overrides this kernel, or triton-cpu ships on PyPI.",
    replace=launcher_override(prefill_gather_lens),
    needed=triton_unavailable,
)

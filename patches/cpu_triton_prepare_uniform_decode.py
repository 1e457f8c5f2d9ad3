"""Run `prepare_uniform_decode`'s Triton kernel in torch on vLLM's CPU build."""

from vllm_ampere.cpu import triton_unavailable
from vllm_ampere.cpu.metadata_kernels import launcher_override, prepare_uniform_decode
from vllm_ampere.patching import Patch

PATCH = Patch(
    name="cpu_triton_prepare_uniform_decode",
    target="vllm.v1.attention.backends.mla.indexer:PrepareUniformDecodeKernel.__call__",
    signature="(self, seq_lens: torch.Tensor, decode_seq_lens: torch.Tensor, block_table: torch.Tensor, expanded_block_table: torch.Tensor, decode_lens: torch.Tensor, num_decode_tokens: int, max_decode_len: int) -> tuple[tuple[int, ...] | None, dict[str, typing.Any]] | tuple[tuple[int, ...] | None, dict[str, typing.Any], typing.Any]",
    why="The DeepSeek indexer metadata builder launches PrepareUniformDecodeKernel for uniform decode batches; the CPU build has no Triton backend, so the launch fails.",
    how="The launcher calls vllm_ampere.cpu.metadata_kernels.prepare_uniform_decode (the kernel's outputs, "
    "computed in torch) instead of launching Triton. Only where Triton is unavailable on the "
    "CPU platform.",
    vllm_checked="0.32.0",
    processes=("workers",),
    remove_when="vLLM's CPU platform overrides this kernel, or triton-cpu ships on PyPI.",
    replace=launcher_override(prepare_uniform_decode),
    needed=triton_unavailable,
)

"""What DeepSeek-V4 needs to run on vLLM's CPU build where that build has gaps.

- `ops`: torch implementations of the `_C` ops the CPU model calls, registered into
  `torch.ops._C` only where the loaded kernel library lacks them (vLLM loads `_C_AVX2` on CPUs
  without AVX-512, and its DeepSeek-V4 kernels exist only in the AVX-512 builds);
- `metadata_kernels`: torch versions of the Triton kernels the attention metadata builders
  launch (vLLM's CPU build has no Triton backend).

The math itself lives in `vllm_ampere.attention.reference` (the references our GPU kernels are
tested against); this package only adapts it to the stock op signatures. The patch records in
patches/cpu_*.py decide when each piece is installed.
"""

from __future__ import annotations


def is_cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def triton_unavailable() -> bool:
    """True on vLLM's CPU build when Triton kernels cannot launch (no triton-cpu backend)."""
    from vllm.triton_utils import HAS_TRITON

    return is_cpu_platform() and not HAS_TRITON

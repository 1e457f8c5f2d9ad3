"""Python faces of the compiled ops, each with its torch reference beside it.

The compiled ops live in extension modules built by setup.py (`vllm_ampere._C` from csrc/, and
others); importing one registers its `torch.ops.vllm_ampere.*` ops. These helpers say whether an
extension imports here, and why not, without raising.
"""

from __future__ import annotations

import functools
import importlib


@functools.cache
def extension_error(module: str = "_C") -> str | None:
    """None when `vllm_ampere.<module>` imports; else the reason (not built, ABI mismatch, ...)."""
    import torch  # noqa: F401  (the extension links against torch's libraries)

    try:
        importlib.import_module(f"vllm_ampere.{module}")
    except ImportError as e:
        return f"vllm_ampere.{module} is not importable: {e}"
    return None


def extension_available(module: str = "_C") -> bool:
    return extension_error(module) is None

"""Fixtures for end-to-end tests: the tiny DeepSeek-V4 checkpoints, made by our real CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

VLLM_AMPERE = [str(Path(sys.executable).parent / "vllm-ampere")]


def run_cli(*args: str, timeout_s: float = 600) -> str:
    """Run `vllm-ampere ARGS` in a subprocess; fail the test with its output if it fails."""
    proc = subprocess.run([*VLLM_AMPERE, *args], capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode:
        pytest.fail(f"vllm-ampere {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """The tiny DeepSeek-V4-Flash: native (FP8/MXFP4), its BF16 twin, and native -> dsv4_int
    by our converter, each made by the real CLI."""
    root = tmp_path_factory.mktemp("tiny_dsv4")
    paths = {"native": root / "native", "bf16": root / "bf16", "dsv4_int": root / "dsv4_int"}
    run_cli("make-tiny", str(paths["native"]))
    run_cli("make-tiny", str(paths["bf16"]), "--dtype", "bf16")
    run_cli("convert", str(paths["native"]), str(paths["dsv4_int"]))
    return paths


# Test-only: CpuPlatform.import_kernels loads vLLM's AVX2 kernel library (`_C_AVX2`) when
# torch reports no AVX-512 (vllm/platforms/cpu.py); saying so in every process of a server makes
# an AVX-512 machine run what an AVX2-only one runs.
_FORCE_AVX2 = '''"""Written by tests/e2e/conftest.py: report no AVX-512 so vLLM loads _C_AVX2."""
import torch.cpu

torch.cpu._is_avx512_supported = lambda: False
'''


@pytest.fixture(scope="session")
def force_avx2_env(tmp_path_factory) -> dict[str, str]:
    """Environment additions that make every Python process of a `vllm serve` load vLLM's AVX2
    kernel library: a sitecustomize on PYTHONPATH (Python imports it at startup)."""
    site = tmp_path_factory.mktemp("force_avx2")
    (site / "sitecustomize.py").write_text(_FORCE_AVX2)
    import os

    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path}

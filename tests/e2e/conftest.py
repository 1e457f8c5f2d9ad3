"""Fixtures for end-to-end tests: the tiny DeepSeek-V4 checkpoints, made by our real CLI."""

from __future__ import annotations

import json
import os
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


# Small KV cache (GiB) and two OpenMP threads: the CI machine has 2 cores and shared memory.
CPU_SERVE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "2"}


def run_bench(model: Path, out: Path, serve_args: str, contexts: str, *extra: str, env: dict | None = None,
              timeout_s: float = 600) -> subprocess.CompletedProcess:
    """`vllm-ampere bench` of `model` at C = 1, 2 and 16 output tokens, starting its own server."""
    cmd = [*VLLM_AMPERE, "bench", "--model", str(model), "--serve-args", serve_args, "--contexts", contexts,
           "--concurrency", "1,2", "--output-len", "16", "--out", str(out), *extra]  # fmt: skip
    return subprocess.run(cmd, env=os.environ | CPU_SERVE_ENV | (env or {}), capture_output=True, text=True,
                          timeout=timeout_s)


def assert_rows_pass(rows: list[dict], expected: list[tuple[str, int]]) -> None:
    """Every row `pass` with all its requests back, the asked prompt length and 16 tokens each."""
    assert [(r["context"], r["concurrency"]) for r in rows] == expected
    for r in rows:
        assert r["result"] == "pass", r
        assert r["completed"] == r["concurrency"] and r["failed_requests"] == 0, r
        # vLLM's client re-aligns prompts to the server's tokenizer: within a token or two.
        assert abs(r["measured_input_tokens"] - r["input_tokens"]) <= 2, r
        saved = json.loads(Path(r["result_json"]).read_text())
        assert saved["num_prompts"] == saved["max_concurrency"] == r["concurrency"]
        assert saved["output_lens"] == [16] * r["concurrency"], r
        # vLLM on CPU turns prefix caching off for MLA models: nothing is queried, so no rate.
        assert r["prefix_cache_hit_rate"] is None and r["external_prefix_cache_hit_rate"] is None, r


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
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path}

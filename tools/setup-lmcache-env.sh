#!/usr/bin/env bash
# Create .venv-lmcache: LMCache's KV cache server (the sidecar of `vllm-ampere cluster`) in a
# venv of its own. LMCache depends on an unpinned `torch` and on CUDA 13 Python packages; in
# .venv it could replace the pinned torch under vLLM, so it never goes there. The torch pin is
# installed first so LMCache resolves against it (the CPU build where setup-env.sh finds one,
# e.g. a local +cpu wheel); the server itself starts on a CPU-only machine.
# Called at the end of tools/setup-env.sh; `vllm-ampere cluster` and the tests find it by path.
set -euo pipefail
cd "$(dirname "$0")/.."
. tools/pins.sh
LMCACHE_VERSION=$(pin LMCACHE_VERSION)
TORCH_VERSION=$(pin TORCH_VERSION)
PYTHON=${PYTHON:-python3}
VENV=${LMCACHE_VENV:-.venv-lmcache}

start=$(date +%s)
"$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip
"${pip[@]}" install -q "torch==$TORCH_VERSION"
"${pip[@]}" install -q "lmcache==$LMCACHE_VERSION" "torch==$TORCH_VERSION"
"$VENV/bin/python" -c "import lmcache.v1.multiprocess.http_server, torch; \
print('setup-lmcache-env: lmcache', __import__('lmcache').__version__, 'torch', torch.__version__, 'ready')"
echo "setup-lmcache-env: $VENV ready in $(($(date +%s) - start)) s"

#!/usr/bin/env bash
# Every GPU check in one call, for a bare CUDA machine with torch, nvcc and pytest (the H200
# lent to sessions, a fresh A100/3090 box): build both extensions for sm_80 with compute_80 PTX
# (newer GPUs JIT it; pins.py also ships sm_86 code, left out here to halve the build), then
# run tests/gpu and, unless --no-bench, the kernel benchmarks. Logs go to $OUT (default out/device-check).
# Where pydantic is missing (the lent H200's image: python 3.12, no pydantic), carry its wheels
# in .whl/ (the converter's config schema needs it); fetch them here, then pass carry [".whl"]:
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux_2_17_x86_64 -d .whl pydantic
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/device-check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/overlay${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
export TORCH_CUDA_ARCH_LIST="8.0+PTX"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

step() {  # step NAME TIMEOUT CMD...: run, log to $OUT/NAME.log, print the verdict
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: rc=$rc in $((SECONDS - start)) s"
    grep -E "error:|Error|FAILED|passed|failed|skipped" "$OUT/$name.log" | tail -15
    return $rc
}

step build 300 python3 setup.py build_ext --inplace || exit 1
step gpu_tests 300 python3 -m pytest -q -rs -p no:cacheprovider tests/gpu
[ "${1:-}" = --no-bench ] && exit 0
step bench_w8a16 120 python3 benchmarks/bench_w8a16.py --quick --json "$OUT/bench_w8a16.json"
step bench_flashmla 120 python3 benchmarks/bench_flashmla.py --json "$OUT/bench_flashmla.json" --md "$OUT/bench_flashmla.md"

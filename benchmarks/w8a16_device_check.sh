#!/usr/bin/env bash
# One-call GPU check of the W8A16 GEMM: build vllm_ampere._C, run its GPU tests, benchmark.
#   bash benchmarks/w8a16_device_check.sh [--no-bench]   (logs under $OUT, default out/w8a16)
# Builds csrc/ alone with torch.utils.cpp_extension (setup.py would also build the sparse-MLA
# extension) for compute_80 PTX + sm_80 code: a newer GPU runs the PTX, as the product ships it.
set -uo pipefail
OUT=${OUT:-out/w8a16}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/overlay PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
export TORCH_CUDA_ARCH_LIST="8.0+PTX"  # not the image's own list: test what an A100/3090 gets
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"

start=$SECONDS
timeout 150 python3 - >"$OUT/build.log" 2>&1 <<'PY'
import glob, shutil
from torch.utils.cpp_extension import load
srcs = sorted(glob.glob("csrc/**/*.cu", recursive=True) + glob.glob("csrc/**/*.cpp", recursive=True))
m = load(name="_C", sources=srcs, extra_include_paths=["csrc"], build_directory="/tmp", verbose=True,
         extra_cflags=["-O3", "-std=c++17"],
         extra_cuda_cflags=["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"])
shutil.copy(m.__file__, "overlay/vllm_ampere/_C.so")
PY
echo "build: rc=$? $((SECONDS - start)) s"; grep -E "error|gencode" "$OUT/build.log" | head -5
python3 -c "from vllm_ampere.ops import extension_error as e; print('extension:', e() or 'ok')"

start=$SECONDS
timeout 100 python3 -m pytest -q -rs -p no:cacheprovider tests/gpu/test_w8a16_gpu.py -k "not bad_shape and not bad_inputs" \
  >"$OUT/gpu_tests.log" 2>&1
echo "gpu tests: rc=$? $((SECONDS - start)) s"; grep -E "FAILED|Error|passed|failed|skipped" "$OUT/gpu_tests.log" | head -30
timeout 45 python3 -m pytest -v -p no:cacheprovider tests/gpu/test_w8a16_gpu.py -k "bad_shape or bad_inputs" \
  >"$OUT/gpu_bad_inputs.log" 2>&1
echo "bad-input tests: rc=$?"; grep -E "PASSED|FAILED|Fatal|line [0-9]+ in test_" "$OUT/gpu_bad_inputs.log" | head -12

[ "${1:-}" = --no-bench ] && exit 0
start=$SECONDS
timeout 150 python3 benchmarks/bench_w8a16.py --json "$OUT/bench.json" >"$OUT/bench.log" 2>&1
echo "bench: rc=$? $((SECONDS - start)) s"; grep -vE "^\S.* M= " "$OUT/bench.log" | tail -120

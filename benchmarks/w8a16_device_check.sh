#!/usr/bin/env bash
# One-call GPU check of the W8A16 GEMM: build vllm_ampere._C, run its GPU tests, benchmark.
#   bash benchmarks/w8a16_device_check.sh     (logs under $OUT, default out/w8a16)
# Builds through setup.py (the product path); if that fails, builds csrc/ alone with
# torch.utils.cpp_extension.load so that the kernels can still be checked.
set -uo pipefail
OUT=${OUT:-out/w8a16}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/overlay PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0+PTX}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"

start=$SECONDS
if ! ls overlay/vllm_ampere/_C*.so >/dev/null 2>&1; then
  timeout 240 python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1 || {
    echo "setup.py build failed (tail below); building csrc/ alone"; tail -30 "$OUT/build.log"
    timeout 200 python3 - >>"$OUT/build.log" 2>&1 <<'PY'
import glob, shutil
from torch.utils.cpp_extension import load
srcs = sorted(glob.glob("csrc/**/*.cu", recursive=True) + glob.glob("csrc/**/*.cpp", recursive=True))
m = load(name="_C", sources=srcs, extra_include_paths=["csrc"], build_directory="/tmp",
         extra_cuda_cflags=["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"])
shutil.copy(m.__file__, "overlay/vllm_ampere/_C.so")
PY
  }
fi
echo "build: $((SECONDS - start)) s"; grep -iE "error|warning" "$OUT/build.log" | head -20
python3 -c "from vllm_ampere.ops import extension_error as e; print('extension:', e() or 'ok')"

start=$SECONDS
timeout 150 python3 -m pytest -q -rs -p no:cacheprovider tests/gpu/test_w8a16_gpu.py \
  >"$OUT/gpu_tests.log" 2>&1
echo "gpu tests: rc=$? $((SECONDS - start)) s"; grep -E "FAILED|Error|passed|failed|skipped" "$OUT/gpu_tests.log" | head -40

start=$SECONDS
timeout 200 python3 benchmarks/bench_w8a16.py --json "$OUT/bench.json" >"$OUT/bench.log" 2>&1
echo "bench: rc=$? $((SECONDS - start)) s"; grep -vE "^\S.* M= " "$OUT/bench.log" | tail -120

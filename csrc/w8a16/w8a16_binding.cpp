// Torch binding of the W8A16 ops: every check lives here, the kernels see plain params.
//
//   vllm_ampere::w8a16_repack(Tensor weight) -> Tensor
//       weight: uint8 [N, K] (q + 128), N % 16 == 0, K % 16 == 0
//       returns uint8 [N/16, ceil(K/32), 512], the n16k32 layout of w8a16_config.h
//   vllm_ampere::w8a16_gemm(Tensor a, Tensor qweight, Tensor scale, Tensor locks,
//                           int split_k=0, int path=0) -> Tensor
//       a: bf16|fp16 [M, K]; qweight: w8a16_repack's output; scale: bf16 [N];
//       locks: int32 [>= ceil(N/64)], zero, owned by this weight (the kernel leaves it zero);
//       split_k: 0 = planned, > 0 = asked-for split (fused path, M <= 32 only);
//       path: 0 = auto (fused for M <= 16, else dequant + cuBLAS), 1 = fused, 2 = dequant + cuBLAS.
//       returns [M, N] in a's dtype.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>

#include "torch_strings.h"
#include "w8a16_config.h"
#include "w8a16_params.h"

namespace {

using vllm_ampere::device_name;
using vllm_ampere::dtype_name;
using vllm_ampere::shape;

constexpr int64_t kPackedBytes = w8a16::kTileBytes;  // bytes per (strip, k-tile)

int device_attribute(cudaDeviceAttr attr, int device) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  return value;
}

void check_cuda_sm80(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "w8a16: ", name, " must be a CUDA tensor, got ", device_name(t));
  const int major = device_attribute(cudaDevAttrComputeCapabilityMajor, t.get_device());
  TORCH_CHECK(major >= 8, "w8a16: needs compute capability >= 8.0 (mma.sync bf16), ", device_name(t),
              " is ", std::to_string(major), ".",
              std::to_string(device_attribute(cudaDevAttrComputeCapabilityMinor, t.get_device())));
}

void check_16b_aligned(const at::Tensor& t, const char* name) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "w8a16: ", name,
              " must be 16-byte aligned (the kernels use 16-byte loads)");
}

void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), "w8a16: ", name, " is on ", device_name(t), ", a is on ",
              device_name(ref));
}

at::Tensor repack(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2, "w8a16_repack: weight must be [N, K], got ", shape(weight));
  TORCH_CHECK(weight.scalar_type() == at::kByte, "w8a16_repack: weight must be uint8 (q + 128), got ",
              dtype_name(weight));
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK(n > 0 && k > 0 && n % 16 == 0 && k % 16 == 0,
              "w8a16_repack: N and K must be positive multiples of 16, got ", shape(weight));
  TORCH_CHECK(n <= INT32_MAX && k <= INT32_MAX && n * k < (int64_t{1} << 40), "w8a16_repack: weight too large");
  TORCH_CHECK(weight.is_contiguous(), "w8a16_repack: weight must be contiguous");
  check_cuda_sm80(weight, "weight");
  check_16b_aligned(weight, "weight");
  const c10::cuda::CUDAGuard guard(weight.device());
  const int64_t k_tiles = (k + w8a16::kTileK - 1) / w8a16::kTileK;
  at::Tensor packed = at::empty({n / 16, k_tiles, kPackedBytes}, weight.options());
  const w8a16::RepackParams p{weight.data_ptr<uint8_t>(), packed.data_ptr<uint8_t>(),
                              static_cast<int>(n), static_cast<int>(k), static_cast<int>(k_tiles)};
  C10_CUDA_CHECK(w8a16::repack(p, c10::cuda::getCurrentCUDAStream()));
  return packed;
}

at::Tensor gemm(const at::Tensor& a, const at::Tensor& qweight, const at::Tensor& scale,
                const at::Tensor& locks, int64_t split_k, int64_t path) {
  TORCH_CHECK(a.dim() == 2, "w8a16_gemm: a must be [M, K], got ", shape(a));
  TORCH_CHECK(a.scalar_type() == at::kBFloat16 || a.scalar_type() == at::kHalf,
              "w8a16_gemm: a must be bfloat16 or float16, got ", dtype_name(a));
  TORCH_CHECK(qweight.dim() == 3 && qweight.scalar_type() == at::kByte &&
                  qweight.size(2) == kPackedBytes,
              "w8a16_gemm: qweight must be w8a16_repack's uint8 [N/16, Kp/32, 512], got ",
              dtype_name(qweight), " ", shape(qweight));
  const int64_t m = a.size(0), k = a.size(1), n = qweight.size(0) * 16;
  const int64_t k_tiles = qweight.size(1);
  TORCH_CHECK(k > 0 && k % 16 == 0, "w8a16_gemm: K must be a positive multiple of 16, got ",
              std::to_string(k));
  TORCH_CHECK(k_tiles == (k + w8a16::kTileK - 1) / w8a16::kTileK, "w8a16_gemm: a has K = ",
              std::to_string(k), " but qweight was packed for ", std::to_string(k_tiles),
              " k-tiles of 32");
  TORCH_CHECK(n > 0 && n <= INT32_MAX && k <= INT32_MAX && m < (int64_t{1} << 31) &&
                  n * k < (int64_t{1} << 40),
              "w8a16_gemm: sizes out of range");
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == n && scale.scalar_type() == at::kBFloat16,
              "w8a16_gemm: scale must be bfloat16 [N = ", std::to_string(n), "], got ", dtype_name(scale), " ",
              shape(scale));
  TORCH_CHECK(locks.dim() == 1 && locks.scalar_type() == at::kInt &&
                  locks.size(0) >= (n + w8a16::kBlockRows - 1) / w8a16::kBlockRows,
              "w8a16_gemm: locks must be int32 [>= ceil(N/64)], got ", dtype_name(locks), " ",
              shape(locks));
  TORCH_CHECK(path >= 0 && path <= 2, "w8a16_gemm: path must be 0 (auto), 1 (fused) or 2 (dequant)");
  TORCH_CHECK(split_k >= 0, "w8a16_gemm: split_k must be >= 0");
  const bool fused = path == 1 || (path == 0 && m <= w8a16::kFusedMaxM);
  TORCH_CHECK(!fused || (m + 31) / 32 <= 65535, "w8a16_gemm: M = ", std::to_string(m),
              " is past the fused kernel's grid; use path 0 or 2");
  TORCH_CHECK(a.is_contiguous() && qweight.is_contiguous() && scale.is_contiguous() &&
                  locks.is_contiguous(),
              "w8a16_gemm: a, qweight, scale and locks must be contiguous");
  check_cuda_sm80(a, "a");
  check_same_device(qweight, a, "qweight");
  check_same_device(scale, a, "scale");
  check_same_device(locks, a, "locks");
  check_16b_aligned(a, "a");
  check_16b_aligned(qweight, "qweight");

  const c10::cuda::CUDAGuard guard(a.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const w8a16::DType dtype =
      a.scalar_type() == at::kBFloat16 ? w8a16::DType::kBF16 : w8a16::DType::kFP16;
  const auto* scale_bits = reinterpret_cast<const uint16_t*>(scale.data_ptr());
  at::Tensor out = at::empty({m, n}, a.options());
  if (m == 0) return out;

  if (!fused) {
    // Prefill: compute-bound, so one dequantizing pass into a temporary and cuBLAS.
    at::Tensor w = at::empty({n, k}, a.options());
    const w8a16::DequantParams dp{qweight.data_ptr<uint8_t>(), scale_bits, w.data_ptr(),
                                  static_cast<int>(n), static_cast<int>(k),
                                  static_cast<int>(k_tiles), dtype};
    C10_CUDA_CHECK(w8a16::dequant(dp, stream));
    return at::matmul_out(out, a, w.t());
  }

  w8a16::GemmParams p{};
  p.a = a.data_ptr();
  p.w = qweight.data_ptr<uint8_t>();
  p.scale = scale_bits;
  p.out = out.data_ptr();
  p.locks = locks.data_ptr<int>();
  p.m = static_cast<int>(m);
  p.n = static_cast<int>(n);
  p.k = static_cast<int>(k);
  p.k_tiles = static_cast<int>(k_tiles);
  p.dtype = dtype;
  const int sms = device_attribute(cudaDevAttrMultiProcessorCount, a.get_device());
  w8a16::plan_split_k(p, sms, static_cast<int>(split_k));
  at::Tensor partial;
  if (p.split_k > 1) {
    partial = at::empty({p.split_k, m, n}, a.options().dtype(at::kFloat));
    p.partial = partial.data_ptr<float>();
  }
  C10_CUDA_CHECK(w8a16::gemm(p, stream));
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vllm_ampere, m) {
  m.def("w8a16_repack(Tensor weight) -> Tensor");
  m.def(
      "w8a16_gemm(Tensor a, Tensor qweight, Tensor scale, Tensor locks, int split_k=0, "
      "int path=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(vllm_ampere, CUDA, m) {
  m.impl("w8a16_repack", &repack);
  m.impl("w8a16_gemm", &gemm);
}

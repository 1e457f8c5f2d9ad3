// Plain parameter structs and launchers of the W8A16 kernels: no torch here, so nvcc alone can
// compile the .cu files. The binding (w8a16_binding.cpp) validates every tensor before filling these.
#pragma once

#include <cuda_runtime.h>
#include <cstdint>

namespace w8a16 {

enum class DType { kBF16, kFP16 };  // activation / output element type

struct GemmParams {
  const void* a;           // [M, K] bf16|fp16, row-major, rows 16-byte aligned
  const uint8_t* w;        // [N/16, Kp/32, 32, 16] repacked q+128 bytes (w8a16_config.h)
  const uint16_t* scale;   // [N] bf16 bits, one scale per output feature
  void* out;               // [M, N] bf16|fp16, row-major
  float* partial;          // [split_k, M, N] fp32 partial sums; unused when split_k == 1
  int* locks;              // [ceil(N/64)] zero on entry, left zero on exit; unused when split_k == 1
  int m, n, k;             // problem size; n % 16 == 0, k % 16 == 0
  int k_tiles;             // Kp / 32
  int split_k;             // CTAs along K; > 1 only when M fits one token tile (gridDim.z == 1)
  int tiles_per_split;     // k-tiles per split, a multiple of kMinSplitTiles
  DType dtype;
};

struct RepackParams {
  const uint8_t* w;  // [N, K] checkpoint q+128 bytes, row-major
  uint8_t* packed;   // [N/16, Kp/32, 32, 16]
  int n, k, k_tiles;
};

struct DequantParams {
  const uint8_t* w;       // [N/16, Kp/32, 32, 16] repacked
  const uint16_t* scale;  // [N] bf16 bits
  void* out;              // [N, K] bf16|fp16: (q+128 - 128) * scale, rounded once
  int n, k, k_tiles;
  DType dtype;
};

// Fills split_k and tiles_per_split (call before sizing `partial`); split_k_override > 0 asks
// for that many splits (tuning, tests), still capped at kMinSplitTiles k-tiles per split.
void plan_split_k(GemmParams& p, int num_sms, int split_k_override);
// Launches the fused kernel for a planned GemmParams; returns the launch error.
cudaError_t gemm(const GemmParams& p, cudaStream_t stream);

cudaError_t repack(const RepackParams& p, cudaStream_t stream);
cudaError_t dequant(const DequantParams& p, cudaStream_t stream);

}  // namespace w8a16

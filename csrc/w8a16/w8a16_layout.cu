// Layout kernels: checkpoint [N, K] bytes <-> the n16k32 repacked tiles (w8a16_config.h).
//   repack:  once per weight at load.
//   dequant: repacked tiles -> [N, K] bf16|fp16 weight (q * scale) for the large-M cuBLAS path.
// One thread per 16-byte lane chunk: it owns 8 k of row g and 8 k of row g + 8 of one tile.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "w8a16_config.h"
#include "w8a16_params.h"

namespace w8a16 {
namespace {

constexpr int kLayoutThreads = 256;

struct LaneChunk {
  size_t row0;  // first of the two weight rows (the second is row0 + 8)
  int k;        // first of the 8 k, may be >= K in the padded tail
};

// Lane chunk i of the packed tensor (i = (strip * k_tiles + kt) * 32 + lane) -> its rows and k.
__device__ __forceinline__ LaneChunk lane_chunk(size_t i, int k_tiles) {
  const int lane = static_cast<int>(i % 32);
  const size_t tile = i / 32;
  const int kt = static_cast<int>(tile % k_tiles);
  const size_t strip = tile / k_tiles;
  return {strip * kStripRows + lane / 4, kt * kTileK + 8 * (lane % 4)};
}

// grid-stride over N/16 * k_tiles * 32 lane chunks.
__global__ void repack_kernel(const RepackParams p) {
  const size_t total = static_cast<size_t>(p.n / kStripRows) * p.k_tiles * 32;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const LaneChunk c = lane_chunk(i, p.k_tiles);
    uint2 lo = make_uint2(0x80808080u, 0x80808080u), hi = lo;  // padding: q = 0
    if (c.k < p.k) {
      lo = *reinterpret_cast<const uint2*>(p.w + c.row0 * p.k + c.k);
      hi = *reinterpret_cast<const uint2*>(p.w + (c.row0 + 8) * p.k + c.k);
    }
    reinterpret_cast<uint4*>(p.packed)[i] = make_uint4(lo.x, lo.y, hi.x, hi.y);
  }
}

__device__ __forceinline__ float bf16_bits(uint16_t b) { return __uint_as_float(uint32_t(b) << 16); }
__device__ __forceinline__ void to_out(float x, __nv_bfloat16& y) { y = __float2bfloat16_rn(x); }
__device__ __forceinline__ void to_out(float x, __half& y) { y = __float2half_rn(x); }

// 8 bytes (two words) of one row -> 8 dequantized values -> one 16-byte store.
template <typename T>
__device__ __forceinline__ void store_row(uint32_t w0, uint32_t w1, float scale, T* dst) {
  union { T v[8]; uint4 u; } o;
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    const int byte = ((e < 4 ? w0 : w1) >> (8 * (e % 4))) & 0xFF;
    to_out(static_cast<float>(byte - 128) * scale, o.v[e]);
  }
  *reinterpret_cast<uint4*>(dst) = o.u;
}

// T: bf16 | fp16 output. grid-stride over lane chunks; the K padding is not written.
template <typename T>
__global__ void dequant_kernel(const DequantParams p) {
  const size_t total = static_cast<size_t>(p.n / kStripRows) * p.k_tiles * 32;
  T* out = static_cast<T*>(p.out);
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const LaneChunk c = lane_chunk(i, p.k_tiles);
    if (c.k >= p.k) continue;
    const uint4 w = reinterpret_cast<const uint4*>(p.w)[i];
    store_row(w.x, w.y, bf16_bits(p.scale[c.row0]), out + c.row0 * p.k + c.k);
    store_row(w.z, w.w, bf16_bits(p.scale[c.row0 + 8]), out + (c.row0 + 8) * p.k + c.k);
  }
}

int grid_for(size_t total) {
  const size_t blocks = (total + kLayoutThreads - 1) / kLayoutThreads;
  return static_cast<int>(blocks < 65535 * 16 ? blocks : 65535 * 16);  // grid-stride covers the rest
}

}  // namespace

cudaError_t repack(const RepackParams& p, cudaStream_t stream) {
  const size_t total = static_cast<size_t>(p.n / kStripRows) * p.k_tiles * 32;
  repack_kernel<<<grid_for(total), kLayoutThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t dequant(const DequantParams& p, cudaStream_t stream) {
  const size_t total = static_cast<size_t>(p.n / kStripRows) * p.k_tiles * 32;
  if (p.dtype == DType::kBF16)
    dequant_kernel<__nv_bfloat16><<<grid_for(total), kLayoutThreads, 0, stream>>>(p);
  else
    dequant_kernel<__half><<<grid_for(total), kLayoutThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace w8a16

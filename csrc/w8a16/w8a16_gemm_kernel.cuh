// The fused W8A16 kernel: stream the repacked INT8 weights once, dequantize in registers,
// m16n8k16 tensor-core products with fp32 accumulation, per-row scale in the epilogue, and an
// optional split-K whose last CTA per 64-row block sums the partials (no second launch).
//
// Included by one translation unit per activation dtype (w8a16_gemm_{bf16,fp16}.cu).
#pragma once

#include "w8a16_config.h"
#include "w8a16_params.h"
#include "w8a16_primitives.cuh"

namespace w8a16 {

__device__ __forceinline__ float bf16_bits_to_float(uint16_t bits) {
  return __uint_as_float(static_cast<uint32_t>(bits) << 16);
}

// Step 1a: issue the 16-byte weight loads of one ring stage, the k-tiles from kt (those < kt_end).
__device__ __forceinline__ void load_stage(const uint8_t* w, int kt, int kt_end,
                                           uint4 (&stage)[kStageTiles]) {
#pragma unroll
  for (int u = 0; u < kStageTiles; ++u)
    if (kt + u < kt_end) stage[u] = ld_stream(w + u * kTileBytes);
}

// Step 1b: dequantize the stage's k-tiles from kt (those < kt_end) and multiply them with the
// activations of the warp's 8*MT tokens.
template <typename T, int MT>
__device__ __forceinline__ void mma_stage(const GemmParams& p, const uint4 (&stage)[kStageTiles],
                                          int kt, int kt_end, int t, const T* const (&a_row)[MT],
                                          const bool (&a_valid)[MT], FragC (&acc)[MT]) {
#pragma unroll
  for (int u = 0; u < kStageTiles; ++u) {
    if (kt + u >= kt_end) break;
    const int k0 = (kt + u) * kTileK;  // first k of this tile; this lane's k is k0 + 8t
    FragA step0, step1;
    dequant_tile<T>(stage[u], step0, step1);
#pragma unroll
    for (int j = 0; j < MT; ++j) {
      // K padding (k >= K) and absent tokens contribute zeros.
      uint4 x = make_uint4(0, 0, 0, 0);
      if (a_valid[j] && k0 + 8 * t < p.k) x = ld_act(a_row[j] + k0);
      MmaType<T>::mma(acc[j], step0, FragB{{x.x, x.y}});
      MmaType<T>::mma(acc[j], step1, FragB{{x.z, x.w}});
    }
  }
}

// Step 1c: one warp streams its 16-row strip over k-tiles [kt_begin, kt_end) and accumulates
// 16 rows x 8*MT tokens through the register ring (w8a16_config.h): use stage s, then refill it
// with the tiles kStages stages ahead. The stage loop is unrolled so that every stage lives in
// fixed registers; the first design rotated two buffers by assignment, which nvcc compiled to
// register copies that wait for the loads, leaving one chunk in flight per warp (seen in SASS).
template <typename T, int MT>
__device__ __forceinline__ void stream_strip(const GemmParams& p, int strip, int kt_begin,
                                             int kt_end, int m_base, int lane, FragC (&acc)[MT]) {
  constexpr int kRingTiles = kStages * kStageTiles;
  const int g = lane / 4, t = lane % 4;
  // [k_tiles, 32 lanes, 16 B] of this strip, from kt_begin, at this lane.
  const uint8_t* w = p.w + (static_cast<size_t>(strip) * p.k_tiles + kt_begin) * kTileBytes + lane * 16;
  // Token m_base + 8j + g, offset by this lane's first k (8t) of every k-tile.
  const T* a_row[MT];
  bool a_valid[MT];
#pragma unroll
  for (int j = 0; j < MT; ++j) {
    const int token = m_base + j * kTokensPerTile + g;
    a_valid[j] = token < p.m;
    a_row[j] = static_cast<const T*>(p.a) + static_cast<size_t>(a_valid[j] ? token : 0) * p.k + 8 * t;
  }

  uint4 ring[kStages][kStageTiles];
#pragma unroll
  for (int s = 0; s < kStages; ++s)
    load_stage(w + s * kStageTiles * kTileBytes, kt_begin + s * kStageTiles, kt_end, ring[s]);
  for (int kt = kt_begin; kt < kt_end; kt += kRingTiles) {
#pragma unroll
    for (int s = 0; s < kStages; ++s) {
      const int kt_s = kt + s * kStageTiles;
      if (kt_s >= kt_end) break;
      mma_stage<T, MT>(p, ring[s], kt_s, kt_end, t, a_row, a_valid, acc);
      load_stage(w + (s + kStages) * kStageTiles * kTileBytes, kt_s + kRingTiles, kt_end, ring[s]);
    }
    w += kRingTiles * kTileBytes;
  }
}

// Step 2a (no split-K): scale rows and write out[token, row] in the output dtype.
template <typename T, int MT>
__device__ __forceinline__ void store_out(const GemmParams& p, int strip, int m_base, int lane,
                                          const FragC (&acc)[MT]) {
  const int g = lane / 4, t = lane % 4;
  const int row0 = strip * kStripRows + g, row1 = row0 + 8;
  const float s0 = bf16_bits_to_float(p.scale[row0]), s1 = bf16_bits_to_float(p.scale[row1]);
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int j = 0; j < MT; ++j) {
#pragma unroll
    for (int c = 0; c < 2; ++c) {  // tokens 2t, 2t+1 of this tile
      const int token = m_base + j * kTokensPerTile + 2 * t + c;
      if (token >= p.m) continue;
      out[static_cast<size_t>(token) * p.n + row0] = MmaType<T>::from_float(acc[j].r[c] * s0);
      out[static_cast<size_t>(token) * p.n + row1] = MmaType<T>::from_float(acc[j].r[2 + c] * s1);
    }
  }
}

// Step 2b (split-K): write the unscaled fp32 partial of this split to partial[split, token, row].
template <int MT>
__device__ __forceinline__ void store_partial(const GemmParams& p, int strip, int lane,
                                              const FragC (&acc)[MT]) {
  const int g = lane / 4, t = lane % 4;
  const int row0 = strip * kStripRows + g, row1 = row0 + 8;
  float* part = p.partial + static_cast<size_t>(blockIdx.y) * p.m * p.n;
#pragma unroll
  for (int j = 0; j < MT; ++j) {
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int token = j * kTokensPerTile + 2 * t + c;
      if (token >= p.m) continue;
      part[static_cast<size_t>(token) * p.n + row0] = acc[j].r[c];
      part[static_cast<size_t>(token) * p.n + row1] = acc[j].r[2 + c];
    }
  }
}

// Step 3 (split-K): the last CTA to finish a 64-row block sums its split_k partials in split
// order (deterministic), scales, writes the output and re-arms the lock for the next call.
template <typename T>
__device__ __forceinline__ void reduce_if_last(const GemmParams& p) {
  __shared__ int is_last;
  __threadfence();  // publish this CTA's partial before counting it
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(&p.locks[blockIdx.x], 1) == p.split_k - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  const int row_base = blockIdx.x * kBlockRows;
  const int rows = min(kBlockRows, p.n - row_base);
  T* out = static_cast<T*>(p.out);
  for (int i = threadIdx.x; i < p.m * rows; i += kThreads) {
    const int token = i / rows, row = row_base + i % rows;
    const float* src = p.partial + static_cast<size_t>(token) * p.n + row;
    float sum = 0.f;
    for (int s = 0; s < p.split_k; ++s) sum += __ldcg(src + static_cast<size_t>(s) * p.m * p.n);
    out[static_cast<size_t>(token) * p.n + row] =
        MmaType<T>::from_float(sum * bf16_bits_to_float(p.scale[row]));
  }
  if (threadIdx.x == 0) p.locks[blockIdx.x] = 0;
}

// grid (ceil(N/64) row blocks, split_k, ceil(M / 8MT) token blocks), kThreads threads.
// T: bf16 | fp16 activations and output. MT: 8-token mma tiles per warp (token block 8*MT).
template <typename T, int MT>
__global__ void __launch_bounds__(kThreads) gemm_kernel(const GemmParams p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int strip = blockIdx.x * kWarps + warp;  // this warp's 16 weight rows
  const bool has_strip = strip < p.n / kStripRows;
  const int kt_begin = blockIdx.y * p.tiles_per_split;
  const int kt_end = min(p.k_tiles, kt_begin + p.tiles_per_split);
  const int m_base = blockIdx.z * MT * kTokensPerTile;

  FragC acc[MT] = {};
  if (has_strip) stream_strip<T, MT>(p, strip, kt_begin, kt_end, m_base, lane, acc);
  if (p.split_k == 1) {
    if (has_strip) store_out<T, MT>(p, strip, m_base, lane, acc);
    return;
  }
  if (has_strip) store_partial<MT>(p, strip, lane, acc);
  reduce_if_last<T>(p);
}

template <typename T, int MT>
cudaError_t launch_gemm(const GemmParams& p, cudaStream_t stream) {
  const dim3 grid((p.n + kBlockRows - 1) / kBlockRows, p.split_k,
                  (p.m + MT * kTokensPerTile - 1) / (MT * kTokensPerTile));
  gemm_kernel<T, MT><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace w8a16

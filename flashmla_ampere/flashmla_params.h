// Plain parameter structs and launchers of the sparse-MLA kernels: no torch here, so nvcc alone
// compiles the .cu files. flashmla_binding.cpp checks every tensor before filling these.
// Strides are in elements of the pointed-to type; every index and byte offset that can pass
// 2^31 is 64-bit.
#pragma once

#include <cuda_runtime.h>
#include <cstdint>

namespace flashmla_ampere {

// One fp8_ds_mla paged cache and the index stream that addresses it.
struct PagedStream {
  const uint8_t* cache;      // [num_blocks, block_stride] bytes; layout in flashmla_config.h
  int64_t block_stride;      // bytes between blocks (cache.stride(0)), a multiple of 16
  int block_size;            // tokens per block
  int64_t num_slots;         // num_blocks * block_size: slots >= this are out of range
  const int32_t* indices;    // [b, s_q, width] slots (block * block_size + offset), -1 = none
  int64_t idx_stride_b, idx_stride_s;
  int width;                 // entries per query in `indices` (0: stream absent)
  const int32_t* lengths;    // [b] entries used per batch row, or nullptr (all `width`)
};

struct DecodeParams {
  const uint16_t* q;         // [b, s_q, h_q, 512] bf16 bits; last dim contiguous
  int64_t q_stride_b, q_stride_s, q_stride_h;
  int b, s_q, h_q;           // h_q % 32 == 0
  float scale_log2;          // softmax_scale * log2(e)
  PagedStream streams[2];    // [0]: sliding window, [1]: compressed top-k (width 0 if absent)
  int num_splits;            // ceil((width0 + width1) / kSplitEntries)
  float* o_partial;          // [b * s_q, num_splits, h_q, 512] fp32, each split normalized
  float* lse_partial;        // [b * s_q, num_splits, h_q] fp32 natural-log lse, -inf = empty
  // Combine outputs.
  const float* attn_sink;    // [h_q] fp32 or nullptr
  uint16_t* out;             // [b, s_q, h_q, 512] bf16 bits; last dim contiguous
  int64_t out_stride_b, out_stride_s, out_stride_h;
  float* lse;                // [b, h_q, s_q] fp32, contiguous; +inf for an empty query
};

struct PrefillParams {
  const uint16_t* q;         // [s_q, h_q, 512] bf16 bits; last dim contiguous
  int64_t q_stride_t, q_stride_h;
  const uint16_t* kv;        // [s_kv, 512] bf16 bits (K = V); rows 16-byte aligned
  int64_t kv_stride;
  int64_t s_kv;
  const int32_t* indices;    // [s_q, width] rows of kv, invalid: < 0 or >= s_kv
  int64_t idx_stride;
  int width;
  const int32_t* lengths;    // [s_q] or nullptr
  const float* attn_sink;    // [h_q] or nullptr
  int s_q, h_q;
  float scale_log2;
  uint16_t* out;             // [s_q, h_q, 512] bf16 bits
  int64_t out_stride_t, out_stride_h;
  float* max_logits;         // [s_q, h_q] fp32, contiguous
  float* lse;                // [s_q, h_q] fp32, contiguous
};

int decode_num_splits(int width0, int width1);
// Split kernel then combine kernel, on `stream`; returns the first launch error.
cudaError_t sparse_decode(const DecodeParams& p, cudaStream_t stream);
cudaError_t sparse_prefill(const PrefillParams& p, cudaStream_t stream);

}  // namespace flashmla_ampere

// Sparse decode over fp8_ds_mla paged caches, split kernel: CTA (query, split, 32 heads)
// attends over entries [split * 64, +64) of the query's concatenated index list (stream 0 =
// sliding window, then stream 1 = compressed top-k), dequantizing only the selected rows, and
// writes an fp32 partial (o normalized by its own sum, lse). decode_combine.cu merges them.
//
// Pipeline per 32-entry tile: cp.async the raw bytes (576 B + 8 B scales per entry; an invalid
// entry is zero-filled and never read) -> dequantize into bf16 sK -> start the next tile's
// copy -> attend_tile. Splits and tiles with no entry inside the lengths are skipped; that
// changes nothing in the result (they would be fully masked).
#include "../common/attend_tile.cuh"
#include "../flashmla_params.h"

namespace flashmla_ampere {
namespace {

struct Entry {
  const uint8_t* data;   // 576 B token data
  const uint8_t* scale;  // 8 B UE8M0 scales
  bool valid;
};

// Entry e of query (bi, si): stream, bounds and length checks, 64-bit byte offsets.
__device__ __forceinline__ Entry resolve(const DecodeParams& p, int bi, int si, int e, int len0, int len1) {
  const int w0 = p.streams[0].width;
  const bool second = e >= w0;
  const PagedStream& s = second ? p.streams[1] : p.streams[0];
  const int pos = second ? e - w0 : e;
  Entry out{s.cache, s.cache, false};
  if (pos >= (second ? len1 : len0)) return out;  // also covers e beyond both widths
  const int64_t slot = s.indices[bi * s.idx_stride_b + si * s.idx_stride_s + pos];
  if (slot < 0 || slot >= s.num_slots) return out;
  const int64_t block = slot / s.block_size, off = slot % s.block_size;
  const uint8_t* base = s.cache + block * s.block_stride;
  out.data = base + off * kTokenDataBytes;
  out.scale = base + static_cast<int64_t>(s.block_size) * kTokenDataBytes + off * kTokenScaleBytes;
  out.valid = true;
  return out;
}

// Whether any entry of [t, t + 32) lies inside the lengths (cheap skip of padding tiles).
__device__ __forceinline__ bool tile_in_lengths(int t, int w0, int len0, int len1) {
  const int t_end = t + kTileTokens;
  if (t < min(t_end, len0)) return true;  // len0 <= w0
  const int a = max(t, w0) - w0, b = t_end - w0;
  return b > 0 && a < min(b, len1);
}

__device__ __forceinline__ void issue_raw(const DecodeParams& p, char* smem, int bi, int si, int t,
                                          int len0, int len1, int tid) {
  char* raw = smem + kOffRaw;
  const int i = tid >> 2, part = tid & 3;  // 4 threads per entry
  const Entry en = resolve(p, bi, si, t + i, len0, len1);
#pragma unroll
  for (int j = 0; j < kTokenDataBytes / 16 / 4; ++j) {
    const int chunk = part + 4 * j;
    cp_async16(raw + i * kTokenDataBytes + chunk * 16, en.data + (en.valid ? chunk * 16 : 0), en.valid);
  }
  if (part == 0) cp_async8(raw + kSRawDataBytes + i * kTokenScaleBytes, en.scale, en.valid);
}

// sRaw -> sK: 7 x 64 e4m3 NoPE values times their UE8M0 scale, then the 64 bf16 RoPE values.
__device__ __forceinline__ void dequantize_tile(char* smem, int tid) {
  const char* raw = smem + kOffRaw;
  char* sk = smem + kOffK;
  const int i = tid >> 2, part = tid & 3;
  const uint8_t* scales = reinterpret_cast<const uint8_t*>(raw + kSRawDataBytes + i * kTokenScaleBytes);
#pragma unroll
  for (int j = 0; j < kNopeDim / 16 / 4; ++j) {
    const int chunk = part + 4 * j;  // 16 values; chunk / 4 = quant block
    const uint4 w = *reinterpret_cast<const uint4*>(raw + i * kTokenDataBytes + chunk * 16);
    const float sc = ue8m0_to_float(scales[chunk >> 2]);
    const uint32_t words[4] = {w.x, w.y, w.z, w.w};
    uint32_t packed[8];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      float f[4];
      e4m3x4_to_float(words[k], sc, f);
      packed[2 * k] = pack_bf16x2(f[0], f[1]);
      packed[2 * k + 1] = pack_bf16x2(f[2], f[3]);
    }
    uint4* dst = reinterpret_cast<uint4*>(sk + i * kRowPitchBytes + chunk * 32);
    dst[0] = make_uint4(packed[0], packed[1], packed[2], packed[3]);
    dst[1] = make_uint4(packed[4], packed[5], packed[6], packed[7]);
  }
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int chunk = part + 4 * j;  // 8 chunks of 16 B = 64 bf16
    *reinterpret_cast<uint4*>(sk + i * kRowPitchBytes + kNopeDim * 2 + chunk * 16) =
        *reinterpret_cast<const uint4*>(raw + i * kTokenDataBytes + kNopeDim + chunk * 16);
  }
}

__global__ void __launch_bounds__(kThreads, 1) decode_split_kernel(const DecodeParams p) {
  extern __shared__ __align__(16) char smem[];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int split = blockIdx.x % p.num_splits;
  const int64_t qi = blockIdx.x / p.num_splits;
  const int bi = static_cast<int>(qi / p.s_q), si = static_cast<int>(qi % p.s_q);
  const int head0 = blockIdx.y * kHeadsPerCta;

  const int w0 = p.streams[0].width, w1 = p.streams[1].width;
  const int len0 = p.streams[0].lengths ? max(0, min(p.streams[0].lengths[bi], w0)) : w0;
  const int len1 = p.streams[1].lengths ? max(0, min(p.streams[1].lengths[bi], w1)) : w1;
  const int e_begin = split * kSplitEntries, e_end = min(w0 + w1, e_begin + kSplitEntries);

  load_q(smem, p.q + bi * p.q_stride_b + si * p.q_stride_s + head0 * p.q_stride_h, p.q_stride_h, tid);
  int t = e_begin;
  while (t < e_end && !tile_in_lengths(t, w0, len0, len1)) t += kTileTokens;
  if (t < e_end) issue_raw(p, smem, bi, si, t, len0, len1, tid);
  cp_async_commit();

  WarpState st;
  st.init();
  while (t < e_end) {
    cp_async_wait_all();
    __syncthreads();  // raw tile landed; the previous tile's readers of sK are done
    dequantize_tile(smem, tid);
    const uint32_t valid = __ballot_sync(0xffffffffu, resolve(p, bi, si, t + lane, len0, len1).valid);
    __syncthreads();  // sK complete, sRaw free
    int next = t + kTileTokens;
    while (next < e_end && !tile_in_lengths(next, w0, len0, len1)) next += kTileTokens;
    if (next < e_end) issue_raw(p, smem, bi, si, next, len0, len1, tid);
    cp_async_commit();
    attend_tile(st, smem, valid, p.scale_log2, warp, lane);
    t = next;
  }
  cp_async_wait_all();

  float inv_l[2], lse[2];
  finish_rows(st, inv_l, lse);
  const int hg = warp & 1, vh = warp >> 1;
  const int64_t part_row = (qi * p.num_splits + split) * p.h_q;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int head = head0 + hg * 16 + (lane >> 2) + r * 8;
    if (vh == 0 && (lane & 3) == 0) p.lse_partial[part_row + head] = lse[r];
    if (lse[r] == -INFINITY) continue;  // the combine never reads an empty split's o
    float* o = p.o_partial + (part_row + head) * kHeadDim + vh * 256 + (lane & 3) * 2;
#pragma unroll
    for (int j = 0; j < 32; ++j)
      *reinterpret_cast<float2*>(o + j * 8) = make_float2(st.o[j][2 * r] * inv_l[r], st.o[j][2 * r + 1] * inv_l[r]);
  }
}

}  // namespace

int decode_num_splits(int width0, int width1) {
  return max(1, (width0 + width1 + kSplitEntries - 1) / kSplitEntries);
}

cudaError_t launch_decode_combine(const DecodeParams& p, cudaStream_t stream);  // decode_combine.cu

cudaError_t sparse_decode(const DecodeParams& p, cudaStream_t stream) {
  static bool smem_configured[64] = {};
  int device = 0;
  cudaGetDevice(&device);
  if (device < 64 && !smem_configured[device]) {
    const cudaError_t err =
        cudaFuncSetAttribute(decode_split_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemDecode);
    if (err != cudaSuccess) return err;
    smem_configured[device] = true;
  }
  const int64_t queries = static_cast<int64_t>(p.b) * p.s_q;
  if (queries == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(queries * p.num_splits), p.h_q / kHeadsPerCta);
  decode_split_kernel<<<grid, kThreads, kSmemDecode, stream>>>(p);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return launch_decode_combine(p, stream);
}

}  // namespace flashmla_ampere

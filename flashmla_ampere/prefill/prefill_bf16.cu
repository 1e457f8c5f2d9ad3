// Sparse prefill over gathered BF16 KV: CTA (query, 32 heads) attends over the query's index
// list, 32 rows per tile copied straight into sK with cp.async (an invalid index is zero-filled
// and never read), and writes the final output with the sink applied, max_logits and lse.
// Tiles past the query's length are not visited.
#include "../common/attend_tile.cuh"
#include "../flashmla_params.h"

namespace flashmla_ampere {
namespace {

__device__ __forceinline__ bool entry_valid(const PrefillParams& p, int64_t qi, int e, int len, int64_t* row) {
  if (e >= len) return false;
  const int64_t idx = p.indices[qi * p.idx_stride + e];
  *row = idx;
  return idx >= 0 && idx < p.s_kv;
}

__device__ __forceinline__ void issue_rows(const PrefillParams& p, char* smem, int64_t qi, int t, int len, int tid) {
  char* sk = smem + kOffK;
  const int i = tid >> 2, part = tid & 3;  // 4 threads per row, 16 chunks of 16 B each
  int64_t row = 0;
  const bool valid = entry_valid(p, qi, t + i, len, &row);
  const uint16_t* src = p.kv + (valid ? row * p.kv_stride : 0);
#pragma unroll
  for (int j = 0; j < kHeadDim / 8 / 4; ++j) {
    const int chunk = part + 4 * j;
    cp_async16(sk + i * kRowPitchBytes + chunk * 16, src + (valid ? chunk * 8 : 0), valid);
  }
}

__global__ void __launch_bounds__(kThreads, 1) prefill_kernel(const PrefillParams p) {
  extern __shared__ __align__(16) char smem[];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t qi = blockIdx.x;
  const int head0 = blockIdx.y * kHeadsPerCta;
  const int len = p.lengths ? max(0, min(p.lengths[qi], p.width)) : p.width;

  load_q(smem, p.q + qi * p.q_stride_t + head0 * p.q_stride_h, p.q_stride_h, tid);
  cp_async_commit();
  WarpState st;
  st.init();
  for (int t = 0; t < len; t += kTileTokens) {
    __syncthreads();  // the previous tile's readers of sK are done
    issue_rows(p, smem, qi, t, len, tid);
    cp_async_commit();
    int64_t unused;
    const uint32_t valid = __ballot_sync(0xffffffffu, entry_valid(p, qi, t + lane, len, &unused));
    cp_async_wait_all();
    __syncthreads();
    attend_tile(st, smem, valid, p.scale_log2, warp, lane);
  }
  cp_async_wait_all();

  float inv_l[2], lse[2];
  finish_rows(st, inv_l, lse);
  const int hg = warp & 1, vh = warp >> 1;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int head = head0 + hg * 16 + (lane >> 2) + r * 8;
    const bool empty = lse[r] == -INFINITY;
    float factor = inv_l[r];
    if (!empty && p.attn_sink) factor *= 1.f / (1.f + __expf(p.attn_sink[head] - lse[r]));
    uint16_t* out = p.out + qi * p.out_stride_t + head * p.out_stride_h + vh * 256 + (lane & 3) * 2;
#pragma unroll
    for (int j = 0; j < 32; ++j)
      *reinterpret_cast<uint32_t*>(out + j * 8) = pack_bf16x2(st.o[j][2 * r] * factor, st.o[j][2 * r + 1] * factor);
    if (vh == 0 && (lane & 3) == 0) {
      p.lse[qi * p.h_q + head] = empty ? INFINITY : lse[r];
      p.max_logits[qi * p.h_q + head] = empty ? -INFINITY : st.m[r] * 0.69314718055994531f;
    }
  }
}

}  // namespace

cudaError_t sparse_prefill(const PrefillParams& p, cudaStream_t stream) {
  static bool smem_configured[64] = {};
  int device = 0;
  cudaGetDevice(&device);
  if (device < 64 && !smem_configured[device]) {
    const cudaError_t err =
        cudaFuncSetAttribute(prefill_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemPrefill);
    if (err != cudaSuccess) return err;
    smem_configured[device] = true;
  }
  if (p.s_q == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(p.s_q), p.h_q / kHeadsPerCta);
  prefill_kernel<<<grid, kThreads, kSmemPrefill, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace flashmla_ampere

// Sparse decode, combine kernel: one CTA per (query, head) merges the fp32 split partials
// (lse-weighted), applies the attention sink, writes the bf16 output and the lse.
//   lse = log(sum_s exp(lse_s));  o = sum_s exp(lse_s - lse) * o_s
//   o *= exp(lse) / (exp(lse) + exp(sink))          (FlashMLA's attn_sink definition)
//   no valid entry at all: o = 0, lse = +inf         (FlashMLA tests/ref.py convention)
#include <cfloat>

#include "../common/primitives.cuh"
#include "../flashmla_config.h"
#include "../flashmla_params.h"

namespace flashmla_ampere {
namespace {

constexpr int kCombineThreads = kHeadDim / 4;  // 4 output dims per thread

__global__ void __launch_bounds__(kCombineThreads) decode_combine_kernel(const DecodeParams p) {
  const int64_t qi = blockIdx.x / p.h_q;
  const int head = blockIdx.x % p.h_q;
  const int bi = static_cast<int>(qi / p.s_q), si = static_cast<int>(qi % p.s_q);
  const float* lse_s = p.lse_partial + qi * p.num_splits * p.h_q + head;

  float mx = -INFINITY;
  for (int s = 0; s < p.num_splits; ++s) mx = fmaxf(mx, lse_s[s * p.h_q]);
  float sum = 0.f;
  if (mx != -INFINITY)
    for (int s = 0; s < p.num_splits; ++s) sum += __expf(lse_s[s * p.h_q] - mx);
  const bool empty = mx == -INFINITY;
  const float lse = empty ? -INFINITY : mx + __logf(sum);

  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  if (!empty) {
    const float* o_s = p.o_partial + (qi * p.num_splits * p.h_q + head) * kHeadDim + threadIdx.x * 4;
    for (int s = 0; s < p.num_splits; ++s) {
      const float l = lse_s[s * p.h_q];
      if (l == -INFINITY) continue;  // an empty split wrote no o
      const float w = __expf(l - lse);
      const float4 v = *reinterpret_cast<const float4*>(o_s + static_cast<int64_t>(s) * p.h_q * kHeadDim);
      acc.x += w * v.x;
      acc.y += w * v.y;
      acc.z += w * v.z;
      acc.w += w * v.w;
    }
  }
  float factor = empty ? 0.f : 1.f;
  if (!empty && p.attn_sink) factor = 1.f / (1.f + __expf(p.attn_sink[head] - lse));
  uint16_t* out = p.out + bi * p.out_stride_b + si * p.out_stride_s + head * p.out_stride_h + threadIdx.x * 4;
  *reinterpret_cast<uint2*>(out) = make_uint2(pack_bf16x2(acc.x * factor, acc.y * factor),
                                              pack_bf16x2(acc.z * factor, acc.w * factor));
  if (threadIdx.x == 0)
    p.lse[(static_cast<int64_t>(bi) * p.h_q + head) * p.s_q + si] = empty ? INFINITY : lse;
}

}  // namespace

cudaError_t launch_decode_combine(const DecodeParams& p, cudaStream_t stream) {
  const int64_t blocks = static_cast<int64_t>(p.b) * p.s_q * p.h_q;
  decode_combine_kernel<<<static_cast<unsigned>(blocks), kCombineThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace flashmla_ampere

// The attention step both kernels share: one tile of 32 KV rows (already bf16 in sK) against
// the CTA's 32 query heads (in sQ), with an online softmax kept per warp in registers.
// Layout of warps and shared memory: flashmla_config.h.
#pragma once

#include <cfloat>

#include "../flashmla_config.h"
#include "primitives.cuh"

namespace flashmla_ampere {

// Per-warp running state: 16 heads x 256 output dims (32 n-tiles of the mma C fragment) plus
// the softmax max (in log2 units of the scaled score) and the lane's share of the row sums,
// for the lane's two rows (lane / 4 and lane / 4 + 8).
struct WarpState {
  float o[32][4];
  float m[2];
  float l[2];

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int j = 0; j < 32; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) o[j][c] = 0.f;
    m[0] = m[1] = -INFINITY;
    l[0] = l[1] = 0.f;
  }
};

// Copy 32 heads x 512 bf16 of one query into sQ (cp.async; caller commits and waits).
__device__ __forceinline__ void load_q(char* smem, const uint16_t* q, int64_t stride_h, int tid) {
  char* sq = smem + kOffQ;
#pragma unroll 4
  for (int c = tid; c < kHeadsPerCta * (kHeadDim / 8); c += kThreads) {
    const int row = c / (kHeadDim / 8), chunk = c % (kHeadDim / 8);
    cp_async16(sq + row * kRowPitchBytes + chunk * 16, q + row * stride_h + chunk * 8, true);
  }
}

// One tile: S = Q K^T (masked by `valid`, bit e = entry e of the tile), online softmax,
// O += P V. Contains one __syncthreads (the partial-S exchange), so every thread must call it.
__device__ __forceinline__ void attend_tile(WarpState& st, char* smem, uint32_t valid,
                                            float scale_log2, int warp, int lane) {
  const int hg = warp & 1, vh = warp >> 1;
  const char* sq = smem + kOffQ;
  const char* sk = smem + kOffK;
  float* ss = reinterpret_cast<float*>(smem + kOffS);

  // --- S partial over this warp's 256 dims: 16 heads x 32 tokens.
  float s[4][4];
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int c = 0; c < 4; ++c) s[j][c] = 0.f;
  const char* q_base = sq + (hg * 16 + (lane & 15)) * kRowPitchBytes + (vh * 256 + (lane >> 4) * 8) * 2;
  const char* k_base = sk + ((lane & 7) + ((lane >> 4) << 3)) * kRowPitchBytes +
                       (vh * 256 + ((lane >> 3) & 1) * 8) * 2;
#pragma unroll
  for (int ks = 0; ks < 16; ++ks) {
    uint32_t a[4];
    ldmatrix_x4(a, q_base + ks * 32);
#pragma unroll
    for (int np = 0; np < 2; ++np) {
      uint32_t b[4];
      ldmatrix_x4(b, k_base + np * 16 * kRowPitchBytes + ks * 32);
      mma_bf16(s[2 * np], a, b[0], b[1]);
      mma_bf16(s[2 * np + 1], a, b[2], b[3]);
    }
  }

  // --- Exchange with the warp holding the other 256 dims of the same heads. a + b == b + a in
  // IEEE arithmetic, so both warps see bit-identical scores.
#pragma unroll
  for (int i = 0; i < 16; ++i) ss[(warp * 16 + i) * 32 + lane] = s[i / 4][i % 4];
  __syncthreads();
  const int partner = warp ^ 2;
#pragma unroll
  for (int i = 0; i < 16; ++i) s[i / 4][i % 4] += ss[(partner * 16 + i) * 32 + lane];

  // --- Mask, scale, online softmax (rows: c0,c1 -> row 0; c2,c3 -> row 1).
  float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int col = j * 8 + (lane & 3) * 2 + (c & 1);
      s[j][c] = ((valid >> col) & 1u) ? s[j][c] * scale_log2 : -INFINITY;
      mx[c >> 1] = fmaxf(mx[c >> 1], s[j][c]);
    }
  float ref[2], alpha[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
    const float m_new = fmaxf(st.m[r], mx[r]);
    ref[r] = m_new == -INFINITY ? 0.f : m_new;  // nothing valid yet: keep everything at 0
    alpha[r] = exp2f(st.m[r] - ref[r]);
    st.m[r] = m_new;
    st.l[r] *= alpha[r];
  }
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      s[j][c] = exp2f(s[j][c] - ref[c >> 1]);
      st.l[c >> 1] += s[j][c];
    }
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    st.o[j][0] *= alpha[0];
    st.o[j][1] *= alpha[0];
    st.o[j][2] *= alpha[1];
    st.o[j][3] *= alpha[1];
  }

  // --- O += P V: P (bf16) re-used from the C fragments as A fragments (k = tokens).
  uint32_t pa[2][4];
#pragma unroll
  for (int kk = 0; kk < 2; ++kk) {
    pa[kk][0] = pack_bf16x2(s[2 * kk][0], s[2 * kk][1]);
    pa[kk][1] = pack_bf16x2(s[2 * kk][2], s[2 * kk][3]);
    pa[kk][2] = pack_bf16x2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    pa[kk][3] = pack_bf16x2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
  }
  const char* v_base = sk + ((lane & 7) + ((lane >> 3) & 1) * 8) * kRowPitchBytes + (vh * 256 + (lane >> 4) * 8) * 2;
#pragma unroll
  for (int kk = 0; kk < 2; ++kk)
#pragma unroll
    for (int np = 0; np < 16; ++np) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, v_base + kk * 16 * kRowPitchBytes + np * 32);
      mma_bf16(st.o[2 * np], pa[kk], b[0], b[1]);
      mma_bf16(st.o[2 * np + 1], pa[kk], b[2], b[3]);
    }
}

// Row sums across the quad; returns per row: 1/l (0 when empty) and the natural-log lse
// (-inf when empty).
__device__ __forceinline__ void finish_rows(WarpState& st, float (&inv_l)[2], float (&lse)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = st.l[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const bool empty = !(l > 0.f);
    inv_l[r] = empty ? 0.f : 1.f / l;
    lse[r] = empty ? -INFINITY : (st.m[r] + log2f(l)) * 0.69314718055994531f;
  }
}

}  // namespace flashmla_ampere

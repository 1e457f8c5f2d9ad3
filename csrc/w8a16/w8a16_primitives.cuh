// Fragment types and device primitives of the W8A16 kernels (sm_80+: mma.sync bf16, L2 hints).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

namespace w8a16 {

// m16n8k16 operand fragments (PTX ISA, "mma.m16n8k16" fragment layouts), as raw registers.
// A (weights, 16 rows g/g+8 x k16): a[0] = (row g, k 2t..2t+1), a[1] = (row g+8, k 2t..2t+1),
//                                   a[2] = (row g, k 2t+8..2t+9), a[3] = (row g+8, k 2t+8..2t+9).
// B (activations, k16 x 8 tokens):  b[0] = (k 2t..2t+1, token g),  b[1] = (k 2t+8..2t+9, token g).
// C (fp32, 16 rows x 8 tokens):     c[0..1] = (row g, tokens 2t, 2t+1), c[2..3] = (row g+8, same).
struct FragA { uint32_t r[4]; };
struct FragB { uint32_t r[2]; };
struct FragC { float r[4]; };

template <typename T> struct MmaType;
template <> struct MmaType<__nv_bfloat16> {
  // Tensor-core product with fp32 accumulation; the weight codes are exact in bf16. Not
  // volatile: it has no side effect, so the compiler may schedule loads around it.
  static __device__ __forceinline__ void mma(FragC& c, const FragA& a, const FragB& b) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c.r[0]), "+f"(c.r[1]), "+f"(c.r[2]), "+f"(c.r[3])
        : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(b.r[0]), "r"(b.r[1]));
  }
  // Two bytes b0, b1 of `w` (selected by sel_lo/sel_hi) -> bf16x2 (b0-128, b1-128), exactly:
  // 0x4B000000 | b is the fp32 2^23 + b; subtracting 2^23 + 128 leaves an integer in [-128, 127]
  // whose fp32 bits end in 16 zeros, so its top half is the exact bf16.
  static __device__ __forceinline__ uint32_t dequant_pair(uint32_t w, uint32_t sel_lo,
                                                          uint32_t sel_hi) {
    const float lo = __uint_as_float(__byte_perm(w, 0x4B000000u, sel_lo)) - 8388736.0f;
    const float hi = __uint_as_float(__byte_perm(w, 0x4B000000u, sel_hi)) - 8388736.0f;
    return __byte_perm(__float_as_uint(lo), __float_as_uint(hi), 0x7632);
  }
  // (b0, b1, b2, b3) of `w` -> two bf16x2 registers (b0-128, b1-128), (b2-128, b3-128).
  static __device__ __forceinline__ void dequant4(uint32_t w, uint32_t& r01, uint32_t& r23) {
    r01 = dequant_pair(w, 0x7440, 0x7441);
    r23 = dequant_pair(w, 0x7442, 0x7443);
  }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};
template <> struct MmaType<__half> {
  static __device__ __forceinline__ void mma(FragC& c, const FragA& a, const FragB& b) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c.r[0]), "+f"(c.r[1]), "+f"(c.r[2]), "+f"(c.r[3])
        : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(b.r[0]), "r"(b.r[1]));
  }
  // 0x6400 | b is the fp16 1024 + b (10-bit mantissa); one half2 subtract of 1152 gives b - 128.
  static __device__ __forceinline__ void dequant4(uint32_t w, uint32_t& r01, uint32_t& r23) {
    const __half2 bias = __halves2half2(__ushort_as_half(0x6480), __ushort_as_half(0x6480));
    uint32_t x01 = __byte_perm(w, 0x64646464u, 0x5140);
    uint32_t x23 = __byte_perm(w, 0x64646464u, 0x5342);
    __half2 h01 = __hsub2(*reinterpret_cast<__half2*>(&x01), bias);
    __half2 h23 = __hsub2(*reinterpret_cast<__half2*>(&x23), bias);
    r01 = *reinterpret_cast<uint32_t*>(&h01);
    r23 = *reinterpret_cast<uint32_t*>(&h23);
  }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
};

// Weights are read exactly once: bypass L1 (keep it for the shared activations) and let L2
// fetch 256-byte sectors ahead of the warp's contiguous stream. Volatile keeps the prefetch
// where it is written instead of sunk next to its use.
__device__ __forceinline__ uint4 ld_stream(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// Activations are re-read by every warp of the CTA: the read-only path keeps them in L1.
__device__ __forceinline__ uint4 ld_act(const void* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

// The lane's 16 bytes (8 k of row g, then 8 k of row g+8) -> the A fragments of the two
// m16n8k16 steps of a 16x32 tile. The k order is permuted consistently with load_b: step 0
// takes the lane's k 0..3, step 1 its k 4..7 (slots 2t,2t+1 <- k 0,1 and 2t+8,2t+9 <- k 2,3).
template <typename T>
__device__ __forceinline__ void dequant_tile(const uint4& w, FragA& s0, FragA& s1) {
  MmaType<T>::dequant4(w.x, s0.r[0], s0.r[2]);  // row g,   k 0..3
  MmaType<T>::dequant4(w.y, s1.r[0], s1.r[2]);  // row g,   k 4..7
  MmaType<T>::dequant4(w.z, s0.r[1], s0.r[3]);  // row g+8, k 0..3
  MmaType<T>::dequant4(w.w, s1.r[1], s1.r[3]);  // row g+8, k 4..7
}

}  // namespace w8a16

// sm80 building blocks: cp.async, ldmatrix, mma.sync m16n8k16 bf16, fp8 e4m3 decode.
// Nothing here needs sm89+/sm90 (no cvt from e4m3, no wgmma, no TMA).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

namespace flashmla_ampere {

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy; src_bytes == 0 zero-fills the destination and reads nothing, which is
// how out-of-range entries stay outside the cache.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async8(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(valid ? 8 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

// Four 8x8 b16 matrices; lane l supplies the row address of matrix l / 8.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

// D += A (16x16 bf16, row) * B (16x8 bf16, col), fp32 accumulators.
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// Four e4m3 bytes -> four floats, each multiplied by `scale`. The bytes are moved into fp16
// bit positions (exponent bias 7 -> 15 is a factor 2^-8, folded into the scale); fp16 keeps
// e4m3's subnormals exact, where an fp32 route would lose them to --use_fast_math's FTZ.
// e4m3fn's NaN code (0x7f) is not special-cased: vLLM's quantizer clamps to +-448 and never
// writes it.
__device__ __forceinline__ void e4m3x4_to_float(uint32_t w, float scale, float (&f)[4]) {
  const uint32_t even = ((w & 0x00800080u) << 8) | ((w & 0x007f007fu) << 7);  // bytes 0, 2
  const uint32_t odd = (w & 0x80008000u) | ((w & 0x7f007f00u) >> 1);          // bytes 1, 3
  const float2 e = __half22float2(*reinterpret_cast<const __half2*>(&even));
  const float2 o = __half22float2(*reinterpret_cast<const __half2*>(&odd));
  const float s = scale * 256.0f;
  f[0] = e.x * s;
  f[1] = o.x * s;
  f[2] = e.y * s;
  f[3] = o.y * s;
}

// UE8M0 byte -> 2^(byte - 127). Byte 0 (2^-127, never written by vLLM) reads as 0 under FTZ.
__device__ __forceinline__ float ue8m0_to_float(uint32_t byte) { return __uint_as_float(byte << 23); }

}  // namespace flashmla_ampere

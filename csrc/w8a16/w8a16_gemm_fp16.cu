// fp16 instantiations of the fused kernel. MT = 1, 2, 4 token tiles cover M <= 8 (decode), 16 and
// 32; auto dispatch uses the fused kernel up to kFusedMaxM (16), a forced one loops 32-token blocks.
#include "w8a16_gemm_kernel.cuh"

namespace w8a16 {
template cudaError_t launch_gemm<__half, 1>(const GemmParams&, cudaStream_t);
template cudaError_t launch_gemm<__half, 2>(const GemmParams&, cudaStream_t);
template cudaError_t launch_gemm<__half, 4>(const GemmParams&, cudaStream_t);
}  // namespace w8a16

// Host dispatcher of the fused kernel: token-tile width, split-K plan, dtype switch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "w8a16_config.h"
#include "w8a16_params.h"

namespace w8a16 {

// Defined in w8a16_gemm_kernel.cuh, instantiated in w8a16_gemm_{bf16,fp16}.cu.
template <typename T, int MT>
cudaError_t launch_gemm(const GemmParams& p, cudaStream_t stream);

namespace {
int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Narrowest instantiated token tile that holds M (all of it up to 32 tokens).
int token_tiles(int m) { return m <= 8 ? 1 : m <= 16 ? 2 : 4; }

template <typename T>
cudaError_t launch(const GemmParams& p, cudaStream_t stream) {
  switch (token_tiles(p.m)) {
    case 1: return launch_gemm<T, 1>(p, stream);
    case 2: return launch_gemm<T, 2>(p, stream);
    default: return launch_gemm<T, 4>(p, stream);
  }
}
}  // namespace

void plan_split_k(GemmParams& p, int num_sms, int split_k_override) {
  const int row_blocks = ceil_div(p.n, kBlockRows);
  const int token_blocks = ceil_div(p.m, kTokensPerTile * token_tiles(p.m));
  int split = 1;
  // Split K only when the row blocks alone leave the GPU short of kTargetCtasPerSm CTAs per SM,
  // only when one token block covers M (the locks are per row block), and never into pieces
  // shorter than kMinSplitTiles.
  if (token_blocks == 1) {
    split = split_k_override > 0 ? split_k_override : num_sms * kTargetCtasPerSm / row_blocks;
    split = std::max(1, std::min(split, ceil_div(p.k_tiles, kMinSplitTiles)));
  }
  p.tiles_per_split = ceil_div(ceil_div(p.k_tiles, split), kMinSplitTiles) * kMinSplitTiles;
  p.split_k = ceil_div(p.k_tiles, p.tiles_per_split);  // no empty split
}

cudaError_t gemm(const GemmParams& p, cudaStream_t stream) {
  return p.dtype == DType::kBF16 ? launch<__nv_bfloat16>(p, stream) : launch<__half>(p, stream);
}

}  // namespace w8a16

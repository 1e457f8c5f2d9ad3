// INT8 W8A16 GEMM: tile sizes, repacked layout and shared-memory plan, in one place.
//
// out[M, N] = A[M, K] (bf16 | fp16) x ((W[N, K] - 128) * scale[N])^T, W the checkpoint's q+128 bytes.
//
// Roles are swapped against the usual GEMM (AllSpark/GEMV style): the weight is the mma A operand
// (its 16 rows are 16 output features) and the activations are the B operand (8 tokens), so a
// decode step with M = 1..8 pads tokens to 8, not to 16, and the weight never leaves registers.
//
// Repacked layout ("n16k32", built once at load by w8a16_repack):
//   packed[N/16][Kp/32][32 lanes][16 bytes], Kp = K rounded up to 32, pad bytes = 128 (q = 0).
//   Lane l = 4*g + t (g = l/4 in 0..8, t = l%4) of strip s, k-tile kt holds
//     bytes 0..7  = W[16s + g    ][32kt + 8t .. 32kt + 8t + 8)
//     bytes 8..15 = W[16s + g + 8][32kt + 8t .. 32kt + 8t + 8)
//   so one 16-byte load per lane fetches a 16x32 weight tile and a warp reads 512 contiguous bytes.
//   The k order inside the tile is permuted (see w8a16_primitives.cuh): the lane's 8 consecutive k
//   feed the two m16n8k16 steps of the tile, and the B fragment of the same lane is then 8
//   consecutive activations of one token, a single 16-byte load too.
//
// Shared-memory plan: none for the tiles. Weights go global -> registers (each byte is read once,
// L1 bypassed); activations go global -> registers through L1, where the CTA's warps share them.
// The only shared memory is one int for the split-K "last CTA" flag.
#pragma once

namespace w8a16 {

constexpr int kStripRows = 16;  // weight rows per warp: the mma M dimension
constexpr int kTileK = 32;      // k per 16-byte lane load: two m16n8k16 steps
constexpr int kTileBytes = kStripRows * kTileK;  // 512: one warp-wide load
constexpr int kTokensPerTile = 8;                // mma N dimension: tokens per n8 tile

constexpr int kWarps = 4;                    // warps per CTA, one 16-row strip each
constexpr int kThreads = kWarps * 32;        // 128
constexpr int kBlockRows = kWarps * kStripRows;  // 64 output features per CTA (one split-K lock)
// Weight loads go through a register ring of kStages stages of kStageTiles k-tiles (16 registers
// per stage, 64 in all): while one stage is dequantized and multiplied, the other three (6 KiB
// per warp, 96 KiB per SM at 4 CTAs) are in flight, and a stage is refilled as soon as it is
// used, so each warp keeps DRAM busy instead of waiting one round trip per chunk.
constexpr int kStages = 4;
constexpr int kStageTiles = 4;
// Split-K never cuts K into pieces shorter than this many k-tiles (4 KiB per warp).
constexpr int kMinSplitTiles = 8;

// Split-K: aim for this many CTAs per SM so that enough bytes are in flight to cover DRAM latency.
constexpr int kTargetCtasPerSm = 4;

// Above this M the host dequantizes into a BF16/FP16 buffer and calls cuBLAS instead (see
// w8a16_binding.cpp): each warp re-reads all M activations from L1 per weight tile. On the H200
// (run 2 of benchmarks/bench_w8a16.py) the fused kernel won at M <= 8 on every shape and at
// M = 16 on the large ones, and lost at M = 32 on 9 of the 11 shapes it then measured.
constexpr int kFusedMaxM = 16;

}  // namespace w8a16

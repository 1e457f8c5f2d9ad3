// Tile sizes and the shared-memory plan of the sm80/sm86 sparse-MLA kernels (decode, prefill).
//
// One CTA computes 32 query heads of one query over a run of KV entries. Its 4 warps are a
// 2 x 2 grid: warp w owns heads [16 * (w & 1), +16) of the CTA and output dims
// [256 * (w >> 1), +256). S = Q K^T is split the same way along the head dim (each warp sums
// 256 of the 512 dims; the pair exchanges its 16 x 32 partial through shared memory), so no
// warp computes anything twice. The 16 x 256 fp32 output accumulator is 128 registers a lane.
//
// Shared memory (bytes), sized to fit the RTX 3090's 99 KiB per-block limit (sm_86; an A100
// allows 163 KiB, but one plan for both keeps the kernels identical):
//   sQ    32 heads  x 1040 B (512 bf16 + 16 B pad: ldmatrix rows hit distinct banks)  33,280
//   sK    32 tokens x 1040 B (dequantized bf16 K = V rows)                              33,280
//   sRaw  32 tokens x 576 B token data + 32 x 8 B scales (decode: raw fp8_ds_mla)        18,688
//   sS    4 warps x 16 fp32 x 32 lanes (partial S exchange)                               8,192
//   total (decode)                                                                      93,440
// Prefill copies bf16 rows straight into sK and has no sRaw: 74,752.
#pragma once

#include <cstdint>

namespace flashmla_ampere {

constexpr int kHeadDim = 512;        // DeepSeek-V4: 448 NoPE + 64 RoPE; K = V
constexpr int kNopeDim = 448;
constexpr int kRopeDim = 64;
constexpr int kQuantBlock = 64;      // NoPE dims per UE8M0 scale byte
constexpr int kTokenDataBytes = 576; // 448 e4m3 + 64 bf16
constexpr int kTokenScaleBytes = 8;  // 7 UE8M0 scales + 1 pad
constexpr int kTokenBytes = kTokenDataBytes + kTokenScaleBytes;  // 584

constexpr int kHeadsPerCta = 32;
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kTileTokens = 32;      // KV entries per pipeline step
// Decode: entries per split. Fixed, so a query's split plan depends only on the index arrays'
// widths, never on the batch. Must equal DECODE_SPLIT_ENTRIES in the torch reference.
constexpr int kSplitEntries = 64;

constexpr int kRowPitchBytes = kHeadDim * 2 + 16;  // 1040
constexpr int kSQBytes = kHeadsPerCta * kRowPitchBytes;
constexpr int kSKBytes = kTileTokens * kRowPitchBytes;
constexpr int kSRawDataBytes = kTileTokens * kTokenDataBytes;
constexpr int kSRawBytes = kSRawDataBytes + kTileTokens * kTokenScaleBytes;
constexpr int kSSBytes = kWarps * 16 * 32 * 4;

constexpr int kOffQ = 0;
constexpr int kOffK = kOffQ + kSQBytes;
constexpr int kOffS = kOffK + kSKBytes;
constexpr int kOffRaw = kOffS + kSSBytes;
constexpr int kSmemPrefill = kOffRaw;
constexpr int kSmemDecode = kOffRaw + kSRawBytes;

static_assert(kSmemDecode <= 99 * 1024, "decode must fit sm_86's 99 KiB per block");
static_assert(kTokenDataBytes % 16 == 0 && kRowPitchBytes % 16 == 0, "cp.async needs 16 B rows");
static_assert(kSplitEntries % kTileTokens == 0, "a split is whole tiles");

}  // namespace flashmla_ampere

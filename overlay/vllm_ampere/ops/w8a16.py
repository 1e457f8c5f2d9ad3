"""INT8 W8A16 GEMM (dsv4_int `channel` weights): out = a @ ((w_u8 - 128) * scale[:, None]).T.

API (the runtime's INT8 linear method calls these):
    packed = repack(weight_u8, scale)   # once, at load: uint8 [N, K] (q + 128), bf16 [N]
    out = gemm(a, packed, scale)        # a: bf16|fp16 [M, K] -> [M, N] in a's dtype

`packed` is a `W8A16Weight`: the weight in the kernel's n16k32 tile order, its K, and a small
int32 lock buffer that the split-K kernel uses and leaves zeroed (the Marlin workspace idea).
The scale is used as loaded. One packed weight must not be in two gemm calls running at once on
different streams (they would share the locks); each layer owning its weight satisfies this.

Dispatch of gemm:
  * CPU tensors: gemm_reference (how CPU CI and the CPU engine run).
  * CUDA, compute capability 8.0-8.9, extension built: the compiled op. It picks the fused
    streaming kernel for M <= 16 and a dequantize + cuBLAS path above (prefill: there the
    dequantized weight is rounded to a's dtype before cuBLAS, one rounding more than the
    reference, as with dequant + torch.matmul).
  * CUDA otherwise: RuntimeError saying why. A silent reference fallback on a GPU would
    dequantize every weight on every call. On newer GPUs (the H200 used for tests runs the
    compute_80 PTX) pass force_kernel=True or set VLLM_AMPERE_FORCE_SM80_KERNELS=1.

Repacked layout (defined by repack_reference; csrc/w8a16/w8a16_config.h says why):
    qweight[s, kt, 16*l : 16*l + 16], lane l = 4*g + t, holds
        w[16s + g,     32kt + 8t : 32kt + 8t + 8]  then  w[16s + g + 8, 32kt + 8t : ... + 8]
    with K padded to a multiple of 32 by bytes 128 (q = 0).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from vllm_ampere.ops import extension_available, extension_error

FORCE_ENV = "VLLM_AMPERE_FORCE_SM80_KERNELS"
STRIP_ROWS = 16   # weight rows per warp strip
TILE_K = 32       # k per 16-byte lane load
BLOCK_ROWS = 64   # rows per CTA: one split-K lock each
PATHS = {"auto": 0, "fused": 1, "dequant": 2}

# The GEMMs of DeepSeek-V4-Flash's INT8 linears (quant.layers.INT8_LINEAR_SUFFIXES), (N, K), as
# the pinned vLLM runs them (merged wq_a+wkv and w1+w3, wo_a per group) at the config's dims
# (hidden 4096, q_lora 1024, 64 heads x 512, o_groups 8, o_lora 1024, shared expert 2048, indexer
# 64 x 128), each shape once. Unsplit (TP 1). The compressors' projections are BF16, so not here.
DSV4_FLASH_SHAPES = {
    "attn.fused_wqa_wkv": (1024 + 512, 4096),
    "attn.wq_b": (64 * 512, 1024),
    "attn.wo_a (one of 8 groups)": (1024, 64 * 512 // 8),
    "attn.wo_b": (4096, 8 * 1024),
    "shared_experts.gate_up, mtp.e_proj / h_proj": (2 * 2048, 4096),
    "shared_experts.down": (4096, 2048),
    "indexer.wq_b": (64 * 128, 1024),
}


class W8A16Weight(NamedTuple):
    qweight: torch.Tensor  # uint8 [N/16, ceil(K/32), 512], n16k32 tile order
    locks: torch.Tensor    # int32 [ceil(N/64)], zero between calls
    k: int                 # the weight's K: the tiles alone cannot tell K = 48 from K = 64


def _check_weight(weight_u8: torch.Tensor, scale: torch.Tensor) -> None:
    if weight_u8.dim() != 2 or weight_u8.dtype != torch.uint8:
        raise ValueError(f"w8a16: weight must be uint8 [N, K], got {weight_u8.dtype} {tuple(weight_u8.shape)}")
    n, k = weight_u8.shape
    if n == 0 or k == 0 or n % 16 or k % 16:
        raise ValueError(f"w8a16: N and K must be positive multiples of 16, got [{n}, {k}]")
    if scale.shape != (n,) or scale.dtype != torch.bfloat16:
        raise ValueError(f"w8a16: scale must be bfloat16 [{n}], got {scale.dtype} {tuple(scale.shape)}")
    if scale.device != weight_u8.device:
        raise ValueError(f"w8a16: scale is on {scale.device}, weight on {weight_u8.device}")


def repack_reference(weight_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] -> uint8 [N/16, ceil(K/32), 512] in the kernel's tile order."""
    n, k = weight_u8.shape
    kp = -(-k // TILE_K) * TILE_K
    w = torch.nn.functional.pad(weight_u8, (0, kp - k), value=128)
    # n = 16s + 8h + g, k = 32kt + 8t + e  ->  [s, kt, g, t, h, e]
    w = w.reshape(n // 16, 2, 8, kp // TILE_K, 4, 8).permute(0, 3, 2, 4, 1, 5)
    return w.reshape(n // 16, kp // TILE_K, 512).contiguous()


def unpack_reference(qweight: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of repack_reference: uint8 [N/16, Kp/32, 512] -> uint8 [N, k]."""
    strips, k_tiles, _ = qweight.shape
    w = qweight.reshape(strips, k_tiles, 8, 4, 2, 8).permute(0, 4, 2, 1, 3, 5)
    return w.reshape(strips * 16, k_tiles * TILE_K)[:, :k]


def repack(weight_u8: torch.Tensor, scale: torch.Tensor) -> W8A16Weight:
    """Checkpoint weight (q + 128 bytes) and its scale -> the packed weight gemm() takes."""
    _check_weight(weight_u8, scale)
    n = weight_u8.shape[0]
    locks = torch.zeros(-(-n // BLOCK_ROWS), dtype=torch.int32, device=weight_u8.device)
    if weight_u8.is_cuda and _kernel_usable(weight_u8.device, force=None):
        qweight = torch.ops.vllm_ampere.w8a16_repack(weight_u8.contiguous())
    else:
        qweight = repack_reference(weight_u8)
    return W8A16Weight(qweight, locks, weight_u8.shape[1])


def gemm_reference(a: torch.Tensor, packed: W8A16Weight, scale: torch.Tensor) -> torch.Tensor:
    """The semantics: fp32 products of a and the integer codes, times the row scale, cast once."""
    _check_gemm(a, packed, scale)
    q = unpack_reference(packed.qweight, packed.k).float() - 128.0
    return ((a.float() @ q.T) * scale.float()).to(a.dtype)


def gemm(
    a: torch.Tensor,
    packed: W8A16Weight,
    scale: torch.Tensor,
    *,
    force_kernel: bool | None = None,
    path: str = "auto",
    split_k: int = 0,
) -> torch.Tensor:
    """a [M, K] bf16|fp16 x packed [N, K] -> [M, N] in a's dtype.

    force_kernel: run the compiled op on CUDA GPUs newer than sm_89 (default: the env var).
    path / split_k: tuning and test overrides ("fused", "dequant"; splits along K).
    """
    _check_gemm(a, packed, scale)
    if not (a.is_cuda and _kernel_usable(a.device, force_kernel)):
        return gemm_reference(a, packed, scale)
    # The kernels read rows with 16-byte loads: a strided view (a slice of a fused output) is
    # copied; contiguous inputs pass as they are.
    return torch.ops.vllm_ampere.w8a16_gemm(a.contiguous(), packed.qweight, scale, packed.locks, split_k,
                                            PATHS[path])


def _check_gemm(a: torch.Tensor, packed: W8A16Weight, scale: torch.Tensor) -> None:
    if a.dim() != 2 or a.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"w8a16: a must be bfloat16|float16 [M, K], got {a.dtype} {tuple(a.shape)}")
    if a.shape[1] != packed.k:
        raise ValueError(f"w8a16: a has K = {a.shape[1]}; the weight was packed for K = {packed.k}")
    n = packed.qweight.shape[0] * STRIP_ROWS
    if scale.shape != (n,) or scale.dtype != torch.bfloat16:
        raise ValueError(f"w8a16: scale must be bfloat16 [{n}], got {scale.dtype} {tuple(scale.shape)}")


def _kernel_usable(device: torch.device, force: bool | None) -> bool:
    """True where the compiled op runs on this CUDA device; raises where it cannot."""
    if not extension_available():
        raise RuntimeError(f"w8a16 on {device}: the CUDA extension is not built ({extension_error()})")
    major, minor = torch.cuda.get_device_capability(device)
    if force is None:
        force = os.environ.get(FORCE_ENV, "0") not in ("", "0")
    if (8, 0) <= (major, minor) < (9, 0) or (force and major >= 8):
        return True
    hint = "" if major < 8 else f"; set {FORCE_ENV}=1 to run the sm_80 code anyway"
    raise RuntimeError(f"w8a16: kernels target sm_80..sm_89, {device} is sm_{major}{minor}{hint}")


if extension_available():
    # Shapes for torch.compile / fake tensors; the ops themselves are registered by vllm_ampere._C.
    @torch.library.register_fake("vllm_ampere::w8a16_repack")
    def _repack_fake(weight: torch.Tensor) -> torch.Tensor:
        n, k = weight.shape
        return weight.new_empty((n // 16, (k + TILE_K - 1) // TILE_K, 512))

    @torch.library.register_fake("vllm_ampere::w8a16_gemm")
    def _gemm_fake(a, qweight, scale, locks, split_k=0, path=0) -> torch.Tensor:
        return a.new_empty((a.shape[0], qweight.shape[0] * STRIP_ROWS))

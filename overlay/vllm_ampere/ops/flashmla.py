"""Python face of the sm80 sparse-MLA extension (vllm_ampere._flashmla_C).

`flash_mla_with_kvcache` and `flash_mla_sparse_fwd` take the arguments vLLM 0.32.0's
DeepSeek-V4 layer passes to the stock FlashMLA functions of the same names
(vllm/models/deepseek_v4/nvidia/flashmla.py), so our attention class calls them unchanged.
They run the compiled kernels on a CUDA GPU of capability >= 8.0 when the extension is built,
and the fp32 torch reference (vllm_ampere.attention.reference.sparse_mla) otherwise, on
whatever device the tensors live. `backend="cuda"` / `"torch"` forces one (tests, benchmark).
"""

from __future__ import annotations

import functools
from typing import Literal

import torch

from vllm_ampere.attention.reference import sparse_mla as ref
from vllm_ampere.ops import extension_error

Backend = Literal["auto", "cuda", "torch"]
EXTENSION = "_flashmla_C"  # importing it registers torch.ops.vllm_ampere_flashmla


def extension_available() -> bool:
    return extension_error(EXTENSION) is None


@functools.cache
def _sm80_or_newer(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 0)


def _use_cuda(q: torch.Tensor, backend: Backend) -> bool:
    if backend == "torch":
        return False
    reason = extension_error(EXTENSION)
    usable = (q.is_cuda and reason is None
              and _sm80_or_newer(q.device.index if q.device.index is not None else torch.cuda.current_device()))
    if backend == "cuda" and not usable:
        why = f"{reason} (build it with `make ext` on a CUDA machine)" if reason else f"q is on {q.device}"
        raise RuntimeError(
            "vllm_ampere sparse MLA: backend='cuda' needs a CUDA tensor on an sm80+ GPU and the "
            f"built extension; {why}")
    return usable


def flash_mla_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor | None,
    cache_seqlens: torch.Tensor | None,
    head_dim_v: int,
    tile_scheduler_metadata: object = None,
    num_splits: None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    is_fp8_kvcache: bool = False,
    indices: torch.Tensor | None = None,
    attn_sink: torch.Tensor | None = None,
    extra_k_cache: torch.Tensor | None = None,
    extra_indices_in_kvcache: torch.Tensor | None = None,
    topk_length: torch.Tensor | None = None,
    extra_topk_length: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse decode over fp8_ds_mla paged caches -> (out [b, s_q, h, 512] bf16, lse [b, h, s_q]).

    Only the sparse fp8 mode DeepSeek-V4 uses exists here; block_table, cache_seqlens, the
    scheduler metadata and num_splits are accepted for call compatibility and ignored (the
    split plan is fixed by the index widths, see flashmla_ampere/flashmla_config.h).
    """
    if indices is None or not is_fp8_kvcache or causal:
        raise NotImplementedError(
            "vllm_ampere sparse MLA implements only sparse fp8_ds_mla decode (indices given, "
            "is_fp8_kvcache=True, causal=False): the mode DeepSeek-V4 calls")
    if head_dim_v != ref.HEAD_DIM:
        raise ValueError(f"head_dim_v must be {ref.HEAD_DIM}, got {head_dim_v}")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if not _use_cuda(q, backend):
        o, lse = ref.flash_mla_sparse_decode_ref(
            q, k_cache, indices, topk_length, attn_sink, scale, extra_k_cache,
            extra_indices_in_kvcache, extra_topk_length)
        if out is not None:
            out.copy_(o)
            o = out
        return o, lse
    if out is None:
        out = torch.empty_like(q)
    b, s_q, h, _ = q.shape
    lse = torch.empty(b, h, s_q, dtype=torch.float32, device=q.device)
    torch.ops.vllm_ampere_flashmla.sparse_decode_fwd(
        q, k_cache, indices, topk_length, attn_sink, extra_k_cache, extra_indices_in_kvcache,
        extra_topk_length, scale, out, lse)
    return out, lse


def flash_mla_sparse_fwd(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int = 512,
    attn_sink: torch.Tensor | None = None,
    topk_length: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse prefill over gathered bf16 KV -> (out [s_q, h, 512], max_logits [s_q, h], lse [s_q, h])."""
    if d_v != ref.HEAD_DIM:
        raise ValueError(f"d_v must be {ref.HEAD_DIM}, got {d_v}")
    if not _use_cuda(q, backend):
        o, mx, lse = ref.flash_mla_sparse_prefill_ref(q, kv, indices, sm_scale, attn_sink, topk_length, d_v)
        if out is not None:
            out.copy_(o)
            o = out
        return o, mx, lse
    if out is None:
        out = torch.empty_like(q)
    s_q, h, _ = q.shape
    mx = torch.empty(s_q, h, dtype=torch.float32, device=q.device)
    lse = torch.empty(s_q, h, dtype=torch.float32, device=q.device)
    torch.ops.vllm_ampere_flashmla.sparse_prefill_fwd(
        q, kv, indices, topk_length, attn_sink, float(sm_scale), out, mx, lse)
    return out, mx, lse

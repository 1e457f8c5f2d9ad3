"""vllm_ampere.ops.flashmla on a machine without the extension: the reference path and errors."""

import pytest
import torch

from vllm_ampere.attention.reference import sparse_mla as ref
from vllm_ampere.ops import flashmla


def _case():
    gen = torch.Generator().manual_seed(0)
    cache = torch.zeros(2, 64, ref.TOKEN_BYTES, dtype=torch.uint8)
    ref.insert_fp8_ds_mla(cache, 64, torch.arange(128), torch.randn(128, 512, generator=gen).to(torch.bfloat16))
    q = torch.randn(1, 1, 64, 512, generator=gen).to(torch.bfloat16)
    idx = torch.randint(0, 128, (1, 1, 64), generator=gen, dtype=torch.int32)
    return q, cache, idx


def test_cpu_tensors_take_the_reference_and_fill_out():
    q, cache, idx = _case()
    out = torch.empty_like(q)
    o, lse = flashmla.flash_mla_with_kvcache(q, cache.unsqueeze(-2), None, None, 512, None, is_fp8_kvcache=True,
                                             indices=idx, out=out)
    want, lse_want = ref.flash_mla_sparse_decode_ref(q, cache, idx)
    assert o is out and torch.equal(o, want) and torch.equal(lse, lse_want)
    kv = torch.randn(100, 512).to(torch.bfloat16)
    o, mx, lse = flashmla.flash_mla_sparse_fwd(q[0], kv, idx[0].clamp(max=99), 0.05)
    assert o.shape == (1, 64, 512) and mx.shape == lse.shape == (1, 64)


def test_clear_errors():
    q, cache, idx = _case()
    if not flashmla.extension_available():
        with pytest.raises(RuntimeError, match="backend='cuda'"):
            flashmla.flash_mla_with_kvcache(q, cache.unsqueeze(-2), None, None, 512, None, is_fp8_kvcache=True,
                                            indices=idx, backend="cuda")
    with pytest.raises(NotImplementedError, match="sparse fp8_ds_mla"):
        flashmla.flash_mla_with_kvcache(q, cache.unsqueeze(-2), None, None, 512, None, indices=None)
    with pytest.raises(ValueError, match="head_dim_v"):
        flashmla.flash_mla_with_kvcache(q, cache.unsqueeze(-2), None, None, 448, None, is_fp8_kvcache=True, indices=idx)

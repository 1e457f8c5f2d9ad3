"""DeepSeek-V4 CPU routing references: direct computation on small shapes, and vLLM's own AVX-512
kernels at DeepSeek-V4-Flash's dims (256 experts, top-6) where the loaded build has them."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_ampere.cpu import routing

# Load vLLM's kernel library as its workers do (the AVX-512 build where the CPU has it).
from vllm.platforms import current_platform  # noqa: E402

current_platform.import_kernels()


def _direct_sqrtsoftplus(x: float) -> float:
    return math.sqrt(math.log1p(math.exp(x))) if x < 20 else math.sqrt(x)


def test_hash_topk_direct_small():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 8, generator=g).to(torch.bfloat16)
    tid2eid = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(5)]).to(torch.int32)
    w, ids = routing.hash_topk(logits, tid2eid, 2, "sqrtsoftplus", 0, 8, 1.5)
    for t in range(5):
        s = [_direct_sqrtsoftplus(float(logits[t, int(e)])) for e in tid2eid[t]]
        assert ids[t].tolist() == tid2eid[t].tolist()
        assert w[t].tolist() == pytest.approx([1.5 * v / sum(s) for v in s], rel=1e-5)


def test_biased_topk_direct_small():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 8, generator=g)
    bias = torch.randn(8, generator=g)
    w, ids = routing.biased_topk(logits, logits, bias, 2, True, "sqrtsoftplus", 0, 2.5, True)
    for t in range(4):
        s = [_direct_sqrtsoftplus(float(v)) for v in logits[t]]
        order = sorted(range(8), key=lambda e: -(s[e] + float(bias[e])))[:2]
        assert sorted(ids[t].tolist()) == sorted(order)
        got = dict(zip(ids[t].tolist(), w[t].tolist()))
        assert [got[e] for e in order] == pytest.approx([2.5 * s[e] / sum(s[o] for o in order) for e in order], rel=1e-5)


@pytest.mark.skipif(not routing.stock_op_available("hash_topk_cpu"), reason="this CPU build has no hash_topk_cpu (AVX2)")
def test_hash_topk_matches_stock_kernel_at_flash_dims():
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(64, 256, generator=g) * 3).to(torch.bfloat16)
    tid2eid = torch.stack([torch.randperm(256, generator=g)[:6] for _ in range(64)]).to(torch.int32)
    ref = routing.hash_topk(logits, tid2eid, 6, "sqrtsoftplus", 0, 256, 1.5)
    stock = torch.ops._C.hash_topk_cpu(logits, tid2eid, 6, "sqrtsoftplus", 0, 256, 1.5)
    assert torch.equal(ref[1], stock[1])
    torch.testing.assert_close(ref[0], stock[0], rtol=2e-5, atol=1e-6)


@pytest.mark.skipif(not routing.stock_op_available("biased_topk_cpu"), reason="this CPU build has no biased_topk_cpu (AVX2)")
def test_biased_topk_matches_stock_kernel_at_flash_dims():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 256, generator=g) * 3
    bias = torch.randn(256, generator=g) * 0.1
    ref = routing.biased_topk(logits, logits, bias, 6, True, "sqrtsoftplus", 0, 1.5, True)
    stock = torch.ops._C.biased_topk_cpu(logits, logits, bias, 6, True, "sqrtsoftplus", 0, 1.5, True)
    order_ref, order_stock = ref[1].sort(-1), stock[1].sort(-1)
    assert torch.equal(order_ref.values, order_stock.values)
    torch.testing.assert_close(ref[0].gather(1, order_ref.indices), stock[0].gather(1, order_stock.indices),
                               rtol=2e-5, atol=1e-6)

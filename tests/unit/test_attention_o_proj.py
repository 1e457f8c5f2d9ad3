"""The sm8x output projection pieces against the pinned vLLM's own CPU kernel and plain math."""

import pytest
import torch

from vllm_ampere.attention.o_proj import grouped_wo_a, inverse_rope_o


def _cos_sin_cache(max_pos, rope_dim):
    inv = 1.0 / (10000 ** (torch.arange(0, rope_dim, 2).float() / rope_dim))
    freqs = torch.outer(torch.arange(max_pos).float(), inv)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def test_inverse_rope_matches_vllm_cpu_kernel():
    import vllm._custom_ops as ops

    gen = torch.Generator().manual_seed(0)
    o = torch.randn(5, 64, 512, generator=gen).to(torch.bfloat16)
    positions = torch.tensor([0, 1, 17, 4095, 300], dtype=torch.int64)
    cache = _cos_sin_cache(4096, 64)
    want = ops.inverse_gptj_rope_o_proj_cpu(o, positions, cache, 64)
    got = inverse_rope_o(o, positions, cache, 64)
    assert torch.equal(got[..., :448], o[..., :448])  # NoPE untouched
    torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=1e-2)


def test_inverse_rope_undoes_rotation():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 512, generator=gen, dtype=torch.float32)
    positions = torch.tensor([5, 9, 1000])
    cache = _cos_sin_cache(2048, 64)
    cs = cache[positions]
    cos, sin = cs[:, None, :32], cs[:, None, 32:]
    pairs = x[..., 448:].unflatten(-1, (32, 2))
    rotated = torch.stack((pairs[..., 0] * cos - pairs[..., 1] * sin,
                           pairs[..., 1] * cos + pairs[..., 0] * sin), -1).flatten(-2)
    y = torch.cat([x[..., :448], rotated], -1)
    torch.testing.assert_close(inverse_rope_o(y, positions, cache, 64), x, atol=1e-5, rtol=1e-5)


def test_grouped_wo_a_bf16_and_fp8_refusal():
    gen = torch.Generator().manual_seed(2)
    groups, rank, k = 4, 16, 32
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(torch.randn(groups * rank, k, generator=gen).to(torch.bfloat16), requires_grad=False)
    x = torch.randn(3, groups, k, generator=gen).to(torch.bfloat16)
    z = grouped_wo_a(layer, x, groups, rank)
    want = torch.einsum("tgk,grk->tgr", x.float(), layer.weight.float().view(groups, rank, k))
    torch.testing.assert_close(z.float(), want, atol=5e-2, rtol=2e-2)
    layer.weight = torch.nn.Parameter(layer.weight.to(torch.float8_e4m3fn), requires_grad=False)
    with pytest.raises(TypeError, match="dsv4_int"):
        grouped_wo_a(layer, x, groups, rank)

"""DeepSeek-V4 attention wiring on sm80/sm86, against the pinned vLLM (capabilities faked).

Each patch's replacement is built from the real stock object (`PATCH.replace(PATCH.original())`)
and called directly, so nothing is installed process-wide here; test_patchset.py covers the
installed patchset and the targets' signatures.
"""

from types import SimpleNamespace

import pytest
import torch
from vllm.models.deepseek_v4.nvidia.flashmla import DeepseekV4FlashMLAAttention
from vllm.platforms import current_platform
from vllm.platforms.interface import DeviceCapability
from vllm.v1.attention.backends.registry import AttentionBackendEnum

import vllm_ampere.attention.backend as backend
from vllm_ampere.attention.reference import sparse_mla as ref
from vllm_ampere.patches import attn_flashmla_decode_sm8x, attn_kv_gather_sm8x, attn_select_dsv4_class

H, D = 64, 512


def _config(backend_enum=None):
    return SimpleNamespace(attention_config=SimpleNamespace(backend=backend_enum),
                           kernel_config=SimpleNamespace(enable_jit_warmup=True))


@pytest.fixture
def fake_capability(monkeypatch):
    def set_capability(major, minor):
        monkeypatch.setattr(current_platform, "get_device_capability",
                            lambda device_id=0: DeviceCapability(major, minor))
    return set_capability


def _select():
    patch = attn_select_dsv4_class.PATCH
    return patch.replace(patch.original())


@pytest.mark.parametrize("major,minor", [(8, 0), (8, 6)])
def test_selection_returns_ours_on_sm8x(fake_capability, major, minor):
    fake_capability(major, minor)
    cfg = _config()
    cls = _select()(cfg)
    assert cls is backend.DeepseekV4AmpereAttention
    assert issubclass(cls, DeepseekV4FlashMLAAttention)
    cap = DeviceCapability(major, minor)
    assert cls.backend_cls.supports_compute_capability(cap)
    assert cls.swa_backend_cls.supports_compute_capability(cap)
    assert cls.backend_cls.get_name() == "VLLM_AMPERE_SPARSE_DSV4"
    assert cfg.kernel_config.enable_jit_warmup is False  # Hopper FP8 Triton warmups off
    # An explicit FlashMLA choice is honoured by ours; a FlashInfer one is refused.
    assert _select()(_config(AttentionBackendEnum.FLASHMLA_SPARSE_DSV4)) is cls
    with pytest.raises(ValueError, match="FLASHINFER_MLA_SPARSE_DSV4"):
        _select()(_config(AttentionBackendEnum.FLASHINFER_MLA_SPARSE_DSV4))


def test_selection_refuses_sm75(fake_capability):
    fake_capability(7, 5)
    with pytest.raises(backend.UnsupportedGPUError, match=r"sm_80.*this GPU is sm_75"):
        _select()(_config())
    assert not backend.DeepseekV4AmpereSparseBackend.supports_compute_capability(DeviceCapability(7, 5))


def test_selection_keeps_stock_choice_on_hopper(fake_capability):
    fake_capability(9, 0)
    cfg = _config()
    assert _select()(cfg) is DeepseekV4FlashMLAAttention
    assert cfg.kernel_config.enable_jit_warmup is True
    assert not backend.DeepseekV4AmpereSparseBackend.supports_compute_capability(DeviceCapability(9, 0))


def test_stock_backend_refuses_sm8x():
    """Tripwire: when stock vLLM's DeepSeek-V4 backend accepts sm8x, revisit the patches."""
    from vllm.models.deepseek_v4.sparse_mla import DeepseekV4FlashMLABackend

    assert not DeepseekV4FlashMLABackend.supports_compute_capability(DeviceCapability(8, 6))


def test_swa_builder_plans_without_flashmla():
    builder = object.__new__(backend.DeepseekSparseSWAAmpereMetadataBuilder)
    builder._layer_types = {"c4a", "swaonly"}
    plans = builder.build_tile_scheduler(3)
    assert set(plans) == set(backend._LAYER_TYPES)
    assert plans["c4a"] == backend.FixedSplitPlan("c4a") and plans["c128a"] is None
    assert all(v is None for v in builder.build_tile_scheduler(0).values())


def test_no_full_cuda_graphs_on_sm8x():
    """Our builders keep vLLM from capturing the torch compressor/indexer (host reads) in a full
    CUDA graph: with their NEVER, vLLM's default mode resolves to one without full decode graphs."""
    from vllm.config import CompilationConfig, CompilationMode, CUDAGraphMode
    from vllm.v1.attention.backend import AttentionCGSupport

    attn = backend.DeepseekV4AmpereAttention
    for b in (attn.backend_cls, attn.swa_backend_cls):
        assert b.get_builder_cls().get_cudagraph_support(None, None) is AttentionCGSupport.NEVER
    for mode in (CompilationMode.VLLM_COMPILE, CompilationMode.NONE):
        cfg = CompilationConfig(mode=mode, cudagraph_mode=CUDAGraphMode.FULL_AND_PIECEWISE)
        resolved = cfg.resolve_cudagraph_mode_and_sizes(AttentionCGSupport.NEVER, "VLLM_AMPERE_SPARSE_DSV4")
        assert resolved.decode_mode() is not CUDAGraphMode.FULL and resolved.mixed_mode() is not CUDAGraphMode.FULL


def test_dsv4_default_is_no_cuda_graphs_and_piecewise_is_kept():
    """What the module doc says: vLLM turns on breakable CUDA graphs for DeepSeek-V4, which sets
    compilation mode NONE, so with our NEVER the default resolves to NONE; an explicit PIECEWISE
    stays (it captures around the wide eager region)."""
    from vllm.config import CompilationConfig, CompilationMode, CUDAGraphMode
    from vllm.config.vllm import default_breakable_cudagraph_architectures
    from vllm.v1.attention.backend import AttentionCGSupport

    assert "DeepseekV4ForCausalLM" in default_breakable_cudagraph_architectures()
    for asked, want in ((CUDAGraphMode.FULL_AND_PIECEWISE, CUDAGraphMode.NONE),
                        (CUDAGraphMode.PIECEWISE, CUDAGraphMode.PIECEWISE)):
        cfg = CompilationConfig(mode=CompilationMode.NONE, cudagraph_mode=asked)
        assert cfg.resolve_cudagraph_mode_and_sizes(AttentionCGSupport.NEVER, "VLLM_AMPERE_SPARSE_DSV4") is want


def _paged(num_blocks, block_size, gen):
    stride = block_size * ref.TOKEN_BYTES + 576
    cache = torch.zeros(num_blocks * stride, dtype=torch.uint8).as_strided(
        (num_blocks, block_size, ref.TOKEN_BYTES), (stride, ref.TOKEN_DATA_BYTES, 1))
    kv = torch.randn(num_blocks * block_size, D, generator=gen).to(torch.bfloat16)
    ref.insert_fp8_ds_mla(cache, block_size, torch.arange(num_blocks * block_size), kv)
    return cache


def test_decode_route(monkeypatch):
    """Non-sm8x tensors take the stock function; sm8x ones ours, with the stock call's kwargs."""
    patch = attn_flashmla_decode_sm8x.PATCH
    routed = patch.replace(patch.original())
    gen = torch.Generator().manual_seed(0)
    cache = _paged(4, 64, gen)
    q = torch.randn(2, 1, H, D, generator=gen).to(torch.bfloat16)
    idx = torch.randint(-1, 256, (2, 1, 128), generator=gen, dtype=torch.int32)
    lens = torch.tensor([128, 7], dtype=torch.int32)
    sink = torch.randn(H, generator=gen)
    kwargs = dict(q=q, k_cache=cache.unsqueeze(-2), block_table=None, head_dim_v=512,
                  tile_scheduler_metadata=backend.FixedSplitPlan("swaonly"), cache_seqlens=None,
                  is_fp8_kvcache=True, indices=idx, topk_length=lens, softmax_scale=0.04,
                  attn_sink=sink, extra_k_cache=None, extra_indices_in_kvcache=None,
                  extra_topk_length=None, out=torch.empty_like(q))
    with pytest.raises(RuntimeError, match="FlashMLA|flashmla"):  # stock stub on this CPU build
        routed(**kwargs)
    monkeypatch.setattr(backend, "tensor_on_ampere", lambda t: True)
    out, lse = routed(**kwargs)
    o_ref, lse_ref = ref.flash_mla_sparse_decode_ref(q, cache, idx, lens, sink, 0.04)
    assert out is kwargs["out"]
    torch.testing.assert_close(out, o_ref)
    torch.testing.assert_close(lse, lse_ref)


def test_kv_gather_matches_block_table_walk(monkeypatch):
    patch = attn_kv_gather_sm8x.PATCH
    routed = patch.replace(patch.original())
    monkeypatch.setattr(backend, "tensor_on_ampere", lambda t: True)
    gen = torch.Generator().manual_seed(1)
    bs = 64
    cache = _paged(6, bs, gen)
    block_table = torch.tensor([[3, 1, 5], [0, 2, 99]], dtype=torch.int32)  # 99: out of range
    seq_lens = torch.tensor([150, 190], dtype=torch.int32)
    gather_lens = torch.tensor([100, 190], dtype=torch.int32)
    out = torch.full((2, 200, D), 7.0, dtype=torch.bfloat16)
    routed(out, cache, seq_lens, gather_lens, block_table, bs, 5)
    all_rows = ref.dequantize_fp8_ds_mla(cache, bs, torch.arange(6 * bs), torch.ones(6 * bs, dtype=torch.bool))
    for r in range(2):
        s, g = int(seq_lens[r]), int(gather_lens[r])
        for i, pos in enumerate(range(s - g, s)):
            blk = int(block_table[r, pos // bs])
            want = all_rows[blk * bs + pos % bs].to(torch.bfloat16) if blk < 6 else torch.full((D,), 7.0)
            assert torch.equal(out[r, 5 + i].float(), want.float()), (r, pos)
        assert (out[r, :5] == 7).all() and (out[r, 5 + g:] == 7).all()

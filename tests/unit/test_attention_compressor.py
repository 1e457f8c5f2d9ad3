"""The sm8x compressor store against the pinned vLLM's CPU port of the same kernel."""

import pytest
import torch
import vllm._custom_ops as ops
from vllm.models.deepseek_v4.cpu.cpu_utils import map_local_to_global_slots_cpu

from vllm_ampere.attention.compressor import compress_norm_rope_store
from vllm_ampere.attention.indexer import gather_keys
from vllm_ampere.attention.reference import sparse_mla as ref


def _cos_sin(max_pos, rope_dim=64):
    inv = 1.0 / (10000 ** (torch.arange(0, rope_dim, 2).float() / rope_dim))
    freqs = torch.outer(torch.arange(max_pos).float(), inv)
    return torch.cat([freqs.cos(), freqs.sin()], -1)


@pytest.mark.parametrize("head,ratio", [(512, 4), (512, 128), (128, 4)])
def test_store_matches_vllm_cpu(head, ratio):
    gen = torch.Generator().manual_seed(head + ratio)
    overlap = 1 if ratio == 4 else 0
    window = (1 + overlap) * ratio
    bs, nb = 64, 12
    state = torch.randn(nb, bs, 2 * (1 + overlap) * head, generator=gen)
    block_table = torch.randperm(nb, generator=gen)[:8].view(1, 8).to(torch.int32)
    positions = torch.tensor([2, 3, 7, 8, 127, 255, 259, 511, 300], dtype=torch.int64)
    positions = positions[positions < 8 * bs]
    t = positions.shape[0]
    req = torch.zeros(t, dtype=torch.int64)
    win = positions.unsqueeze(-1) - window + 1 + torch.arange(window)
    gather = map_local_to_global_slots_cpu(win, req, block_table, bs)
    kbs = 64 if ratio == 4 else 2
    k_slots = torch.where((positions + 1) % ratio == 0, positions // ratio, torch.full_like(positions, -1))
    k_slots[-1] = -1
    token_bytes = ref.TOKEN_BYTES if head == 512 else 132
    k_blocks = 300 // kbs + 2
    ours = torch.zeros(k_blocks, kbs, token_bytes, dtype=torch.uint8)
    theirs = ours.clone()
    weight = torch.rand(head, generator=gen) + 0.5
    cos_sin = _cos_sin(1024)
    compress_norm_rope_store(state, gather, positions, k_slots, weight, 1e-6, cos_sin, ours, kbs, ratio)
    fn = ops.compress_norm_rope_store_cpu if head == 512 else ops.compress_norm_rope_store_indexer_cpu
    fn(state, gather, positions, k_slots, weight, 1e-6, cos_sin, theirs.view(k_blocks, -1), kbs, ratio)
    written = k_slots[k_slots >= 0]
    assert written.numel() > 0
    assert (ours != 0).any()
    if head == 512:
        a = ref.dequantize_fp8_ds_mla(ours, kbs, written, torch.ones_like(written, dtype=torch.bool))
        b = ref.dequantize_fp8_ds_mla(theirs, kbs, written, torch.ones_like(written, dtype=torch.bool))
    else:
        va, sa, _ = gather_keys(ours, torch.arange(k_blocks).view(1, -1), torch.tensor([k_blocks * kbs]))
        vb, sb, _ = gather_keys(theirs, torch.arange(k_blocks).view(1, -1), torch.tensor([k_blocks * kbs]))
        a, b = (va.float() * sa.unsqueeze(-1))[written], (vb.float() * sb.unsqueeze(-1))[written]
    torch.testing.assert_close(a, b, atol=0.07 * b.abs().max().item(), rtol=0.07)
    same = (ours == theirs).float().mean().item()
    assert same > 0.98, f"only {same:.3%} of cache bytes identical"


def test_forward_glue_matches_vllm_cpu_compressor(monkeypatch):
    """compressor_forward_sm8x (stock state write, our store) == vLLM's CPU compressor forward,
    with the Triton state-write kernel swapped for vLLM's CPU port of it (same semantics)."""
    from types import SimpleNamespace

    import vllm.models.deepseek_v4.cpu.cpu_compressor as cpu_mod

    import vllm_ampere.attention.compressor_forward as fwd

    gen = torch.Generator().manual_seed(7)
    head, ratio, bs = 512, 4, 64
    coff = 2
    positions = torch.arange(40, 72)  # one request, 32 new tokens (8 block boundaries)
    t = positions.shape[0]
    block_table = torch.tensor([[2, 0, 1]], dtype=torch.int32)
    slot_mapping = block_table[0, positions // bs].to(torch.int64) * bs + positions % bs
    k_slots = torch.where((positions + 1) % ratio == 0, positions // ratio, torch.full_like(positions, -1))
    from vllm.models.deepseek_v4.compressor import CompressorMetadata

    meta = {"state": CompressorMetadata(token_to_req_indices=torch.zeros(t, dtype=torch.int32), slot_mapping=slot_mapping,
                                        block_table=block_table, block_size=bs),
            "kcache": SimpleNamespace(slot_mapping=k_slots)}
    ctx = SimpleNamespace(attn_metadata=meta)

    def layer(kv_cache):
        state = torch.zeros(3, bs, 2 * coff * head)
        state[..., :] = torch.randn(3, bs, 2 * coff * head, generator=torch.Generator().manual_seed(1))
        return SimpleNamespace(coff=coff, head_dim=head, overlap=1, compress_ratio=ratio, use_fp4_cache=False,
                               ape=torch.randn(ratio, coff * head, generator=torch.Generator().manual_seed(2)),
                               state_cache=SimpleNamespace(prefix="state", kv_cache=state), k_cache_prefix="kcache",
                               _static_forward_context={"kcache": SimpleNamespace(kv_cache=kv_cache)},
                               norm=SimpleNamespace(weight=torch.rand(head, generator=torch.Generator().manual_seed(3)) + 0.5),
                               rms_norm_eps=1e-6,
                               _norm_weight_fp32=None)

    kv_score = torch.randn(t, 2 * coff * head, generator=gen)
    rotary = SimpleNamespace(cos_sin_cache=_cos_sin(256))
    ours_cache = torch.zeros(6, 16, ref.TOKEN_BYTES, dtype=torch.uint8)
    theirs_cache = ours_cache.clone()
    ours, theirs = layer(ours_cache), layer(theirs_cache)
    theirs._norm_weight_fp32 = theirs.norm.weight.float().contiguous()

    monkeypatch.setattr(fwd, "get_forward_context", lambda: ctx)
    monkeypatch.setattr(cpu_mod, "get_forward_context", lambda: ctx)
    monkeypatch.setattr(fwd, "_SAVE_PARTIAL_STATES_KERNEL", lambda **k: ops.save_partial_states_cpu(
        k["kv"], k["score"], k["ape"], k["positions"], k["state_cache"], k["slot_mapping"]))
    fwd.compressor_forward_sm8x(ours, kv_score, positions, rotary)
    cpu_mod.DeepseekV4CPUCompressor.forward(theirs, kv_score, positions, rotary)
    assert torch.equal(ours.state_cache.kv_cache, theirs.state_cache.kv_cache)
    written = k_slots[k_slots >= 0]
    a = ref.dequantize_fp8_ds_mla(ours_cache, 16, written, torch.ones_like(written, dtype=torch.bool))
    b = ref.dequantize_fp8_ds_mla(theirs_cache, 16, written, torch.ones_like(written, dtype=torch.bool))
    assert (b != 0).any()
    torch.testing.assert_close(a, b, atol=0.07 * b.abs().max().item(), rtol=0.07)

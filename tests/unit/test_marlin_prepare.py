"""The Marlin preparations on CPU: the routed experts' (Dsv4Int4MoEMethod._prepare_marlin, through
vLLM's real convert_to_wna16_moe_kernel_format, make_wna16_moe_kernel and MarlinExperts) and the
INT8 linears' fallback (Dsv4Int8LinearMethod._prepare_marlin, vLLM's padding and scale helpers).
The CUDA repack ops on those paths are done by vLLM's Python model of the Marlin layout
(marlin_utils_test.marlin_weights, which vLLM's kernel tests hold the CUDA repacks to). The
prepared weights are decoded back with the inverse layout written here and compared with the
spec's dequantization: W4A16 and W8A16 exactly, W4A8 within its 12-bit scale rounding, which is
reported. The Marlin kernels themselves run on a GPU only."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import vllm._custom_ops as custom_ops
from vllm.model_executor.layers.fused_moe.activation import MoEActivation
from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig, FusedMoEParallelConfig
from vllm.model_executor.layers.fused_moe.experts import marlin_moe
from vllm.model_executor.layers.quantization.utils import marlin_utils_test
from vllm.model_executor.layers.quantization.utils.marlin_utils import get_scale_perms
from vllm.scalar_type import scalar_types

from vllm_ampere.convert.codecs import pack_nibbles
from vllm_ampere.flags import KernelPaths, LinearPath, MoePath
from vllm_ampere.quant import moe_w4a16, reference
from vllm_ampere.quant.linear_w8a16 import Dsv4Int8LinearMethod

E, H, LIMIT = 4, 256, 10.0


def repack_by_vllms_model(b_q_weight, size_k, size_n, num_bits, is_a_8bit=False):
    """gptq_marlin_moe_repack's result: GPTQ words [E, K/8, N] to the Marlin tile layout."""
    perm = marlin_utils_test.get_weight_perm(num_bits, is_a_8bit)
    out = []
    for words in b_q_weight:
        q = torch.stack([(words >> (4 * j)) & 0xF for j in range(8)], dim=1).reshape(size_k, size_n)
        out.append(marlin_utils_test.marlin_weights(q, size_k, size_n, num_bits, perm, is_a_8bit=is_a_8bit))
    return torch.stack(out)


def repack8_by_vllms_model(b_q_weight, size_k, size_n, num_bits, is_a_8bit=False):
    """gptq_marlin_repack's result for 8-bit GPTQ words [K/4, N]."""
    q = torch.stack([(b_q_weight >> (8 * j)) & 0xFF for j in range(4)], dim=1).reshape(size_k, size_n)
    return marlin_utils_test.marlin_weights(q, size_k, size_n, num_bits, marlin_utils_test.get_weight_perm(num_bits))


def marlin_codes(packed: torch.Tensor, size_k: int, size_n: int, is_a_8bit: bool, bits: int = 4) -> torch.Tensor:
    """Inverse of the Marlin layout of one weight: the [K, N] codes."""
    perm = marlin_utils_test.get_weight_perm(bits, is_a_8bit)
    words = packed.numpy().astype(np.uint32)
    per_word = 32 // bits
    q = np.zeros((words.shape[0], words.shape[1] * per_word), dtype=np.int64)
    for i in range(per_word):
        q[:, i::per_word] = (words >> (bits * i)) & ((1 << bits) - 1)
    q = torch.from_numpy(q).reshape(-1, perm.numel())[:, torch.argsort(perm)].reshape(size_k // 16, size_n * 16)
    rows = 32 if is_a_8bit else 16  # k rows of one Marlin tile
    return q.reshape(size_k // rows, size_n // 16, rows, 16).permute(0, 2, 1, 3).reshape(size_k, size_n)


def marlin_scales(scales: torch.Tensor, grouped: bool) -> torch.Tensor:
    """Inverse of marlin_permute_scales for one expert: [K/32, N]. W4A8 permutes its group
    scales with the channel-wise permutation, W4A16 with the grouped one."""
    perm = torch.tensor(get_scale_perms()[0 if grouped else 1])
    return scales.reshape(-1, perm.numel())[:, torch.argsort(perm)].reshape(scales.shape)


class ExpertsLayer(torch.nn.Module):
    """The attributes of vLLM's RoutedExperts that the preparation reads, after loading."""

    def __init__(self, inter: int, seed: int, spread_octaves: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.codes = {"w13": torch.randint(-8, 8, (E, 2 * inter, H), generator=g),
                      "w2": torch.randint(-8, 8, (E, H, inter), generator=g)}
        for name, q in self.codes.items():
            exponent = torch.randint(-spread_octaves, 1, (*q.shape[:2], q.shape[2] // 32), generator=g)
            scale = (torch.exp2(exponent.float() - 7) * (1 + 0.9 * torch.rand(exponent.shape, generator=g))).bfloat16()
            self.register_parameter(f"{name}_weight", torch.nn.Parameter(
                pack_nibbles((q + 8).to(torch.uint8)).view(torch.int8), requires_grad=False))
            self.register_parameter(f"{name}_weight_scale_inv", torch.nn.Parameter(scale, requires_grad=False))
        self.want = {name: reference.dequant_int4(getattr(self, f"{name}_weight").data,
                                                  getattr(self, f"{name}_weight_scale_inv").data)
                     for name in self.codes}
        self.intermediate_size_per_partition = inter
        self.num_groups_w13, self.num_groups_w2 = H // 32, inter // 32
        self.swiglu_limit = LIMIT

    def _expert_routing_tables(self):
        return None


def method(inter: int, path: MoePath, monkeypatch) -> moe_w4a16.Dsv4Int4MoEMethod:
    # MarlinExperts refuses to be built off CUDA; its kernel is never called here.
    monkeypatch.setattr(marlin_moe.MarlinExpertsBase, "_supports_current_device", staticmethod(lambda: True))
    monkeypatch.setattr(custom_ops, "gptq_marlin_moe_repack", repack_by_vllms_model)  # = int_wna16's ops
    moe = FusedMoEConfig(num_experts=E, experts_per_token=2, hidden_dim=H, intermediate_size=inter,
                         num_local_experts=E, num_logical_experts=E, activation=MoEActivation.SILU, device="cpu",
                         routing_method=0, moe_parallel_config=FusedMoEParallelConfig.make_no_parallel(),
                         in_dtype=torch.bfloat16, swiglu_limit=LIMIT)
    paths = KernelPaths(path, LinearPath.MARLIN, "test", ("test",))
    return moe_w4a16.Dsv4Int4MoEMethod(moe, paths, "model.layers.0.ffn.experts")


def decoded(layer: ExpertsLayer, is_a_8bit: bool) -> dict[str, torch.Tensor]:
    """The prepared layer's weights as [E, N, K] floats, padding dropped."""
    inter = layer.intermediate_size_per_partition
    padded = layer.w2_weight.shape[1] * 16  # vLLM pads I per gate/up shard to Marlin's tile
    out = {}
    for name, (k, n) in {"w13": (H, 2 * padded), "w2": (padded, H)}.items():
        weights, scales = getattr(layer, f"{name}_weight"), getattr(layer, f"{name}_weight_scale_inv")
        gscale = getattr(layer, "dsv4_a13_gscale" if name == "w13" else "dsv4_a2_gscale")
        experts = []
        for e in range(E):
            s = scales[e].view(torch.int16).float() * gscale.float() if is_a_8bit else scales[e].float()
            s = marlin_scales(s, grouped=not is_a_8bit)
            w = ((marlin_codes(weights[e], k, n, is_a_8bit) - 8).float() * s.repeat_interleave(32, dim=0)).T
            experts.append(torch.cat([w[:inter], w[padded:padded + inter]]) if name == "w13" else w[:, :inter])
        out[name] = torch.stack(experts)
    return out


@pytest.mark.parametrize("inter", [128, 96])  # 96: vLLM pads each gate/up shard to 128
def test_w4a16_prepares_exactly_the_spec_weights(inter, monkeypatch):
    m = method(inter, MoePath.MARLIN_W4A16, monkeypatch)
    layer = ExpertsLayer(inter, seed=inter, spread_octaves=4)
    m._prepare_marlin(layer)
    got = decoded(layer, is_a_8bit=False)
    for name in ("w13", "w2"):
        assert torch.equal(got[name], layer.want[name]), name
    experts = m.moe_kernel.fused_experts
    assert experts.quant_type_id == scalar_types.uint4b8.id and experts.input_dtype is None
    assert m.moe_quant_config.w1_scale is layer.w13_weight_scale_inv
    assert m.moe_quant_config.gemm1_clamp_limit == LIMIT


@pytest.mark.parametrize("octaves,warns", [(4, False), (16, True)])
def test_w4a8_prepares_the_spec_weights_within_its_scale_rounding(octaves, warns, monkeypatch,
                                                                   moe_w4a16_warnings):
    m = method(128, MoePath.MARLIN_W4A8, monkeypatch)
    layer = ExpertsLayer(128, seed=octaves, spread_octaves=octaves)
    # The scales as the spec defines them, before vLLM's preparation replaces them.
    rms = {name: moe_w4a16.w4a8_scale_loss(getattr(layer, f"{name}_weight_scale_inv").data)[0]
           for name in ("w13", "w2")}
    m._prepare_marlin(layer)
    got = decoded(layer, is_a_8bit=True)
    for name in ("w13", "w2"):
        want = layer.want[name]
        row_err = (got[name] - want).norm(dim=-1) / want.norm(dim=-1)
        # What the scale-only estimate predicts: each row's codes spread alike over its groups.
        assert row_err.square().mean().sqrt().item() == pytest.approx(rms[name], rel=0.05), name
    assert m.moe_kernel.fused_experts.input_dtype == torch.int8
    assert m.moe_quant_config.a1_gscale is layer.dsv4_a13_gscale
    warned = moe_w4a16_warnings()
    assert bool(warned) is warns, warned
    if warns:
        assert all("model.layers.0.ffn.experts" in w for w in warned)


@pytest.mark.parametrize("groups,rows,k", [(1, 1536, 4096), (2, 48, 96), (1, 100, 200)])  # wq_a; grouped; padded
def test_int8_linear_marlin_prepares_exactly_the_spec_weights(groups, rows, k, monkeypatch):
    monkeypatch.setattr(custom_ops, "gptq_marlin_repack", repack8_by_vllms_model)
    g = torch.Generator().manual_seed(rows + k)
    q = torch.randint(-127, 128, (groups * rows, k), generator=g)
    scale = (torch.rand(groups * rows, generator=g) * 1e-2 + 1e-3).bfloat16()
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter((q + 128).to(torch.uint8), requires_grad=False)
    layer.weight_scale_inv = torch.nn.Parameter(scale, requires_grad=False)
    layer.params_dtype = torch.bfloat16
    layer.dsv4_tracker = SimpleNamespace(check_complete=lambda prefix: None)
    if groups > 1:  # wo_a: DeepSeek-V4 marks it a bmm over its groups
        layer.is_bmm, layer.bmm_batch_size = True, groups
    want = reference.dequant_int8_channel(layer.weight.data, scale).view(groups, rows, k)
    method = Dsv4Int8LinearMethod("channel", KernelPaths(MoePath.MARLIN_W4A16, LinearPath.MARLIN, "test", ("test",)),
                                  "model.layers.0.attn.wo_a")
    method.process_weights_after_loading(layer)
    pn = layer.weight_scale_inv.shape[-1]
    pk = layer.weight.shape[1] * 16  # Marlin packs 16 k rows per tile row
    for grp in range(groups):
        codes = marlin_codes(layer.weight[grp], pk, pn, is_a_8bit=False, bits=8) - 128
        s = marlin_scales(layer.weight_scale_inv[grp].float(), grouped=False)
        got = (codes.float() * s).T[:rows, :k]
        assert torch.equal(got, want[grp]), grp
    assert layer.dsv4_zp.numel() == 0

"""The pre-repack layout for Marlin against vLLM's own GPTQ packing helpers, and the refusal
of GPUs below sm_80 (faked capability)."""

import pytest
import torch
from vllm.model_executor.layers.quantization.utils.quant_utils import gptq_pack, pack_quantized_values_into_int32
from vllm.scalar_type import scalar_types

from vllm_ampere.convert.codecs import pack_nibbles
from vllm_ampere.flags import ImmaDecision, LinearPath, MoePath, select_kernel_paths
from vllm_ampere.quant import reference
from vllm_ampere.quant.marlin_layout import int4_gptq_qweight, int4_words_n_first, int8_gptq_qweight


@pytest.mark.parametrize("n, k", [(2048, 4096), (4096, 2048), (64, 32), (8, 256)])  # V4-Flash expert dims + edges
def test_int4_words_are_gptq_words(n, k):
    g = torch.Generator().manual_seed(n + k)
    q = torch.randint(-8, 8, (n, k), generator=g)
    stored = pack_nibbles((q + 8).to(torch.uint8)).view(torch.int8)  # the dsv4_int expert bytes
    want = gptq_pack((q + 8).T.contiguous(), 4, k, n)  # what GPTQ feeds gptq_marlin_repack: [K/8, N]
    assert torch.equal(int4_gptq_qweight(stored), want)
    assert torch.equal(int4_words_n_first(stored), pack_quantized_values_into_int32(q + 8, scalar_types.uint4b8, 1))


def test_int4_words_batched_over_experts():
    q = torch.randint(-8, 8, (3, 64, 128))
    stored = pack_nibbles((q + 8).to(torch.uint8))
    words = int4_words_n_first(stored)
    for e in range(3):
        assert torch.equal(words[e], pack_quantized_values_into_int32(q[e] + 8, scalar_types.uint4b8, 1))


@pytest.mark.parametrize("n, k", [(1536, 4096), (4096, 8192), (16, 16)])
def test_int8_qweight_is_gptq_uint8b128(n, k):
    q = torch.randint(-127, 128, (n, k))
    stored = (q + 128).to(torch.uint8)
    assert torch.equal(int8_gptq_qweight(stored), gptq_pack((q + 128).T.contiguous(), 8, k, n))


def test_int4_reference_dequant_matches_spec():
    q = torch.tensor([[-8, 7, 0, 1] * 8])
    scale = torch.tensor([[0.5]], dtype=torch.bfloat16)
    got = reference.dequant_int4(pack_nibbles((q + 8).to(torch.uint8)), scale)
    assert torch.equal(got, q.float() * 0.5)


def test_below_sm80_refused_by_vllm_and_by_us(monkeypatch):
    """vLLM's own get_min_capability() check, and our decision table's reason."""
    from vllm.config import VllmConfig
    from vllm.platforms import current_platform
    from vllm.platforms.interface import DeviceCapability

    import vllm_ampere
    from vllm_ampere.quant.config import Dsv4IntConfig

    vllm_ampere.register()
    monkeypatch.setattr(current_platform, "get_device_capability", lambda device_id=0: DeviceCapability(7, 5))

    class ModelConfig:  # the two fields _get_quantization_config reads before it checks capability
        quantization = "dsv4_int"

    monkeypatch.setattr("vllm.model_executor.model_loader.weight_utils.get_quant_config",
                        lambda model_config, load_config: Dsv4IntConfig.from_config({"quant_method": "dsv4_int"}))
    with pytest.raises(ValueError, match="Minimum capability: 80. Current capability: 75"):
        VllmConfig._get_quantization_config(ModelConfig(), None)
    paths = select_kernel_paths(ImmaDecision(False, "test"), 75, True, True)
    assert paths.moe is MoePath.REFUSED and paths.linear is LinearPath.REFUSED
    assert any("below sm_80" in r for r in paths.reasons)


def test_imma_selects_w4a8_and_block_dequantizes():
    on = ImmaDecision(True, "test")
    assert select_kernel_paths(on, 86, True, False).moe is MoePath.MARLIN_W4A8
    assert select_kernel_paths(on, 86, True, False, "block").linear is LinearPath.DEQUANT_BF16
    assert select_kernel_paths(on, 90, True, False).linear is LinearPath.MARLIN

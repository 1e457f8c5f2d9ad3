"""What W4A8 (IMMA on) does to the routed experts' group scales, against vLLM's own preparation
(marlin_act_int8_process_scales), and the load-time warning when the loss is large."""

import pytest
import torch
from vllm.model_executor.layers.quantization.utils.marlin_utils import marlin_act_int8_process_scales

from vllm_ampere.quant import moe_w4a16


def _spread_scales(experts=5, rows=64, groups=16, octaves=12, seed=0):
    """BF16 group scales over `octaves` powers of two, as MXFP4-derived scales spread."""
    g = torch.Generator().manual_seed(seed)
    exponent = torch.randint(-octaves, 1, (experts, rows, groups), generator=g).float()
    return (torch.exp2(exponent - 6) * (1 + torch.rand(experts, rows, groups, generator=g))).to(torch.bfloat16)


@pytest.mark.parametrize("octaves", [2, 12, 16])
def test_levels_are_vllms(octaves):
    scale = _spread_scales(octaves=octaves)
    stored, factor = marlin_act_int8_process_scales(scale)
    ours = torch.cat([moe_w4a16.w4a8_levels(part, scale.max()) for part in scale.split(2)])
    assert torch.equal(stored.view(torch.int16).float(), ours.float())
    assert factor.item() == pytest.approx(scale.max().float().item() / moe_w4a16.W4A8_SCALE_LEVELS, rel=1e-7)


def test_loss_matches_the_dequantized_scales_vllm_keeps():
    scale = _spread_scales(octaves=12)
    stored, factor = marlin_act_int8_process_scales(scale)
    kept = stored.view(torch.int16).float() * factor
    s = scale.float()
    row_rel = (s - kept).norm(dim=-1) / s.norm(dim=-1)
    zeroed_share = ((kept == 0) & (s != 0)).float().mean().item()
    rms, worst, zeroed = moe_w4a16.w4a8_scale_loss(scale, experts_per_chunk=2)
    assert rms == pytest.approx(row_rel.square().mean().sqrt().item(), rel=1e-5)
    assert worst == pytest.approx(row_rel.max().item(), rel=1e-5)
    assert zeroed == pytest.approx(zeroed_share)
    assert 0 < zeroed < 1  # 12 octaves reach below max / 8192


def test_equal_scales_lose_nothing():
    assert moe_w4a16.w4a8_scale_loss(torch.full((3, 8, 4), 0.01, dtype=torch.bfloat16)) == (0.0, 0.0, 0.0)


def test_one_outlier_zeroes_the_other_rows_and_warns(moe_w4a16_warnings):
    """One scale 2^13 times the others: every other scale rounds to level 0, so every row but the
    outlier's loses all its weights, though the layer-wide L2 error is 0.4%."""
    scale = torch.ones(4, 32, 8, dtype=torch.bfloat16)
    scale[0, 0, 0] = 2.0 ** 13
    rows = 4 * 32
    rms, worst, zeroed = moe_w4a16.w4a8_scale_loss(scale)
    outlier_row = (7 / (2.0 ** 26 + 7)) ** 0.5
    assert rms == pytest.approx(((rows - 1 + outlier_row ** 2) / rows) ** 0.5, rel=1e-6)
    assert worst == 1.0 and zeroed == pytest.approx((scale.numel() - 1) / scale.numel())
    name = "layers.3.ffn.experts.w2_weight_scale_inv"
    moe_w4a16.report_w4a8_scales(name, scale)
    scale[0, 0, 0] = 2.0 ** 5  # the rest at 1/32 of the max keep 128 levels: bf16 rounding only
    assert moe_w4a16.report_w4a8_scales(name, scale) < 0.005
    warned = moe_w4a16_warnings()
    assert len(warned) == 1 and name in warned[0] and "IMMA off" in warned[0]

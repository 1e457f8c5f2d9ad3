"""INT4 routed experts (SPEC-dsv4_int.md section 2): Marlin MoE on CUDA, the torch reference elsewhere.

Parameters, as vLLM's DeepSeek-V4 loader names them: with `expert_dtype: "int4"` its weight
mapper sends every `.scale` to `.weight_scale_inv`, and the expert mapping folds
`experts.E.w{1,3}` into `w13_*` and `experts.E.w2` into `w2_*`:
    w13_weight          int8 [E, 2I, H/2]   nibbles q + 8 (uint4b8), low nibble = element 2j
    w13_weight_scale_inv bf16 [E, 2I, H/32]  one scale per 32 along K
    w2_weight           int8 [E, H, I/2]
    w2_weight_scale_inv  bf16 [E, H, I/32]
vLLM's RoutedExperts.weight_loader does the EP (local experts only) and TP (rows of w1/w3,
columns of w2; scales by the same groups) slicing; scales load as "group" scales.

After loading, on CUDA: the bytes are reinterpreted as GPTQ words (marlin_layout) and handed to
vLLM's WNA16 Marlin preparation (transpose to K-first, gptq_marlin_moe_repack, group-32
marlin_moe_permute_scales, uint4b8), which is also what builds the W4A8 variant (IMMA on:
is_a_8bit repack and marlin_act_int8_process_scales, whose 12-bit scales are checked and reported
per layer first). On CPU: dequantized once to BF16 and run per expert by reference.moe.
"""

from __future__ import annotations

import torch
from vllm.logger import init_logger
from vllm.model_executor.utils import replace_parameter
from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig, FusedMoEQuantConfig
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase

from vllm_ampere.flags import KernelPaths, MoePath
from vllm_ampere.quant import reference
from vllm_ampere.quant.loading import LoadTracker, check_tensor, loads_from_checkpoint, wrap_loader

logger = init_logger(__name__)

GROUP = reference.INT4_GROUP
SHARDS = ("w1", "w2", "w3")
# vLLM 0.32.0's W4A8 Marlin keeps a layer's group scales as integers below this times one factor,
# max(s) / 4096 (marlin_utils.marlin_act_int8_process_scales, computed in the scales' dtype).
W4A8_SCALE_LEVELS = 4096
# Warn above this relative L2 error of the rounded scales (per output row): INT4 with MSE-searched
# group-32 scales already loses about 8.6% (relative L2 on Gaussian weights); errors add in
# quadrature, so 2% more raises that by about 3% of itself.
W4A8_WARN_REL = 0.02


class Dsv4Int4MoEMethod(FusedMoEMethodBase):
    def __init__(self, moe: FusedMoEConfig, paths: KernelPaths, prefix: str):
        super().__init__(moe)
        self.paths = paths
        self.prefix = prefix
        self.marlin = paths.moe in (MoePath.MARLIN_W4A16, MoePath.MARLIN_W4A8)
        if paths.moe is MoePath.REFUSED:
            raise RuntimeError(f"dsv4_int refused on this machine: {'; '.join(paths.reasons)}")
        self.input_dtype = torch.int8 if paths.moe is MoePath.MARLIN_W4A8 else None
        if self.marlin:
            self.experts_cls = _marlin_experts_cls(moe)

    # -- parameters ---------------------------------------------------------------------------
    def create_weights(self, layer, num_experts: int, hidden_size: int, intermediate_size_per_partition: int,
                       params_dtype: torch.dtype, **extra_weight_attrs):
        e, h, i = num_experts, hidden_size, intermediate_size_per_partition
        if h % GROUP or i % GROUP:
            raise ValueError(
                f"dsv4_int: {self.prefix}: hidden size {h} and per-rank intermediate size {i} must be "
                f"multiples of the INT4 group ({GROUP}); pick a tensor-parallel size that keeps them so, "
                "or enable expert parallelism")
        stock_loader = extra_weight_attrs.pop("weight_loader")
        shapes = {
            "w13_weight": ((e, 2 * i, h // 2), torch.int8),
            "w13_weight_scale_inv": ((e, 2 * i, h // GROUP), torch.bfloat16),
            "w2_weight": ((e, h, i // 2), torch.int8),
            "w2_weight_scale_inv": ((e, h, i // GROUP), torch.bfloat16),
        }
        prefix = layer.layer_name.removeprefix("model.")
        tracker = LoadTracker(
            {(x, s, leaf): f"{prefix}.{g}.{s}.{leaf}" for x, g in enumerate(_global_ids(layer, e))
             for s in SHARDS for leaf in ("weight", "scale")},
            enforce=loads_from_checkpoint())
        layer.dsv4_tracker = tracker
        for name, (shape, dtype) in shapes.items():
            param = torch.nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
            layer.register_parameter(name, param)
            for attr, value in extra_weight_attrs.items():
                setattr(param, attr, value)
            param.quant_method = "group"  # RoutedExperts.weight_loader: group scales, sliced like rows
            wrap_loader(param, stock_loader, tracker, self._checker(layer))
        layer.num_groups_w13 = h // GROUP  # read by vLLM's Marlin preparation
        layer.num_groups_w2 = i // GROUP

    def _checker(self, layer):
        cfg = layer.moe_config
        h, i_full = cfg.hidden_dim, cfg.intermediate_size

        def check(tensor: torch.Tensor, weight_name: str, shard_id: str, expert_id: int, return_success=False):
            leaf = "scale" if weight_name.endswith("scale_inv") else "weight"
            n, k = (h, i_full) if shard_id == "w2" else (i_full, h)
            name = f"{layer.layer_name.removeprefix('model.')}.{expert_id}.{shard_id}.{leaf}"
            if leaf == "weight":
                # I8 per the spec; U8 holds the same bytes, so it is taken as is.
                check_tensor(name, tensor, (torch.int8, torch.uint8), (n, k // 2), "INT4 nibbles q + 8")
                tensor = tensor.view(torch.int8)
            else:
                check_tensor(name, tensor, (torch.bfloat16,), (n, k // GROUP), f"one scale per {GROUP} along K")
            local = layer._map_global_expert_id_to_local_expert_id(expert_id)
            return tensor, (local, shard_id, leaf)

        return check

    # -- after loading --------------------------------------------------------------------------
    def process_weights_after_loading(self, layer) -> None:
        layer.dsv4_tracker.check_complete(layer.layer_name)
        logger.info_once("dsv4_int routed experts: %s (%s)", self.paths.moe.value, "; ".join(self.paths.reasons))
        if not self.marlin:
            w13 = reference.dequant_int4(layer.w13_weight.data, layer.w13_weight_scale_inv.data, torch.bfloat16)
            w2 = reference.dequant_int4(layer.w2_weight.data, layer.w2_weight_scale_inv.data, torch.bfloat16)
            replace_parameter(layer, "w13_weight", w13)
            replace_parameter(layer, "w2_weight", w2)
            del layer.w13_weight_scale_inv, layer.w2_weight_scale_inv
            return
        self._prepare_marlin(layer)

    def _prepare_marlin(self, layer) -> None:
        from compressed_tensors.quantization import QuantizationArgs
        from vllm.model_executor.layers.fused_moe.oracle.int_wna16 import (
            WNA16MoEBackend, convert_to_wna16_moe_kernel_format, make_wna16_moe_kernel)

        from vllm_ampere.quant.marlin_layout import int4_words_n_first

        if self.input_dtype == torch.int8:
            for name in ("w13_weight_scale_inv", "w2_weight_scale_inv"):
                report_w4a8_scales(f"{self.prefix}.{name}", getattr(layer, name).data)
        backend = (WNA16MoEBackend.BATCHED_MARLIN if self.moe.moe_parallel_config.use_batched_activation_format
                   else WNA16MoEBackend.MARLIN)
        # vLLM's Marlin preparation reads the format from a QuantizationArgs (the compressed-tensors
        # description of exactly this layout: 4-bit symmetric int, group 32).
        args = QuantizationArgs(num_bits=4, type="int", symmetric=True, group_size=GROUP, strategy="group")
        (w13, w2, s13, s2, _, _, g13, g2, _, _) = convert_to_wna16_moe_kernel_format(
            backend=backend, layer=layer, quant_config=args, input_dtype=self.input_dtype,
            w13=int4_words_n_first(layer.w13_weight.data), w2=int4_words_n_first(layer.w2_weight.data),
            w13_scale=layer.w13_weight_scale_inv.data, w2_scale=layer.w2_weight_scale_inv.data)
        replace_parameter(layer, "w13_weight", w13)
        replace_parameter(layer, "w2_weight", w2)
        replace_parameter(layer, "w13_weight_scale_inv", s13)
        replace_parameter(layer, "w2_weight_scale_inv", s2)
        layer.dsv4_a13_gscale, layer.dsv4_a2_gscale = g13, g2
        self.moe_quant_config = self.get_fused_moe_quant_config(layer)
        self.moe_kernel = make_wna16_moe_kernel(
            moe_quant_config=self.moe_quant_config, moe_config=self.moe, experts_cls=self.experts_cls,
            backend=backend, routing_tables=layer._expert_routing_tables())
        # MarlinExperts reads VLLM_MARLIN_INPUT_DTYPE in its constructor; the weights were repacked
        # for our decision (it travels with the config), so the kernel must take the same one.
        self.moe_kernel.fused_experts.input_dtype = self.input_dtype

    def get_fused_moe_quant_config(self, layer) -> FusedMoEQuantConfig | None:
        if not self.marlin:
            return None  # the CPU reference path needs no kernel description
        from vllm.model_executor.layers.fused_moe.oracle.int_wna16 import make_wna16_moe_quant_config

        return make_wna16_moe_quant_config(
            w1_scale=layer.w13_weight_scale_inv, w2_scale=layer.w2_weight_scale_inv, group_size=GROUP, num_bits=4,
            a1_gscale=getattr(layer, "dsv4_a13_gscale", None), a2_gscale=getattr(layer, "dsv4_a2_gscale", None),
            gemm1_clamp_limit=layer.swiglu_limit)

    # -- forward --------------------------------------------------------------------------------
    def apply(self, layer, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              shared_experts=None, shared_experts_input=None) -> torch.Tensor:
        if not self.marlin:
            return reference.moe(x, layer.w13_weight, layer.w2_weight, topk_weights, topk_ids,
                                 layer.swiglu_limit, layer.expert_map)
        return self.moe_kernel.apply(
            x, layer.w13_weight, layer.w2_weight, topk_weights=topk_weights, topk_ids=topk_ids,
            activation=layer.activation, global_num_experts=layer.global_num_experts,
            expert_map=layer.expert_map, apply_router_weight_on_input=layer.apply_router_weight_on_input,
            shared_experts=shared_experts, shared_experts_input=shared_experts_input)


def w4a8_levels(scale: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """The integer levels vLLM's W4A8 preparation stores for `scale` given the layer's max `top`
    (the same elementwise steps as marlin_act_int8_process_scales, so chunks give equal results)."""
    return (scale / top * W4A8_SCALE_LEVELS).round()


def w4a8_scale_loss(scale: torch.Tensor, experts_per_chunk: int = 8) -> tuple[float, float, float]:
    """What the W4A8 rounding does to one layer's group scales [E, N, K/32], per output row (each
    row of each expert is one output's weights): (root mean square over rows of the row's relative
    L2 error, the worst row's, share of the scales that were nonzero and become 0). Where the INT4
    codes spread alike in every group (as MSE-searched scales make them), a row's scale error is
    also its weights' error. Per row, not over the layer: one outlier scale can zero every other
    row's scales while the layer-wide L2 error stays small. Chunked over experts: a whole layer's
    scales are 134M values at DeepSeek-V4-Flash's dims."""
    top = scale.max()
    factor = top.float() / W4A8_SCALE_LEVELS
    sum_rel2 = worst_rel2 = zeroed = 0.0
    rows = 0
    for part in scale.split(experts_per_chunk):
        levels = w4a8_levels(part, top)
        s = part.float()
        ref = s.square().sum(-1)
        rel2 = torch.where(ref > 0, (s - levels.float() * factor).square().sum(-1) / ref, 0.0)
        sum_rel2 += rel2.sum().item()
        worst_rel2 = max(worst_rel2, rel2.max().item())
        rows += rel2.numel()
        zeroed += ((levels == 0) & (part != 0)).sum().item()
    return (sum_rel2 / max(rows, 1)) ** 0.5, worst_rel2 ** 0.5, zeroed / max(scale.numel(), 1)


def report_w4a8_scales(name: str, scale: torch.Tensor) -> float:
    """Log what W4A8 (IMMA on) does to one layer's group scales; warn above W4A8_WARN_REL.
    Returns the rows' root-mean-square relative error."""
    rms, worst, zeroed = w4a8_scale_loss(scale)
    if rms > W4A8_WARN_REL:
        logger.warning(
            "dsv4_int %s: W4A8 (IMMA on) stores these group scales as 12-bit multiples of their "
            "largest (vLLM's Marlin W4A8), which changes the output rows' scales by %.2f%% (relative "
            "L2, root mean square over rows; worst row %.1f%%; %.3f%% of scales become 0), above "
            "%.0f%%: INT4 alone loses about 8.6%%. IMMA off (W4A16) keeps the BF16 scales.",
            name, 100 * rms, 100 * worst, 100 * zeroed, 100 * W4A8_WARN_REL)
    else:
        logger.debug("dsv4_int %s: W4A8 scale rounding %.3f%% per row (root mean square; worst %.2f%%), "
                     "%.3f%% of scales become 0", name, 100 * rms, 100 * worst, 100 * zeroed)
    return rms


def _marlin_experts_cls(moe: FusedMoEConfig):
    """vLLM's Marlin experts class for this layer, or an error saying why it cannot run."""
    import vllm.model_executor.layers.fused_moe.modular_kernel as mk
    from vllm.model_executor.layers.fused_moe.experts.marlin_moe import BatchedMarlinExperts, MarlinExperts
    from vllm.model_executor.layers.quantization.utils.quant_utils import kInt4Static32

    batched = moe.moe_parallel_config.use_batched_activation_format
    cls = BatchedMarlinExperts if batched else MarlinExperts
    fmt = mk.FusedMoEActivationFormat.BatchedExperts if batched else mk.FusedMoEActivationFormat.Standard
    ok, reason = cls.is_supported_config(cls, moe, kInt4Static32, None, fmt)
    if not ok:
        raise RuntimeError(f"dsv4_int: vLLM's Marlin MoE cannot run this layer: {reason}")
    return cls


def _global_ids(layer, num_local: int) -> list[int]:
    """Global expert id of each local slot (the identity without expert parallelism)."""
    expert_map = layer.expert_map  # global id -> local slot, -1 elsewhere
    if expert_map is None:
        return list(range(num_local))
    ids = [0] * num_local
    for g, local in enumerate(expert_map.tolist()):
        if local >= 0:
            ids[local] = g
    return ids


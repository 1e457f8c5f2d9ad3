"""Let the DeepSeek-V4 CPU attention dequantize a dsv4_int INT8 `wo_a` correctly."""

from __future__ import annotations

import functools

from vllm_ampere.patching import Patch


def _replace(dequant_linear_weight):
    @functools.wraps(dequant_linear_weight)
    def dequant_linear_weight_dsv4_int(layer):
        from vllm_ampere.quant.linear_w8a16 import Dsv4Int8LinearMethod

        method = getattr(layer, "quant_method", None)
        if isinstance(method, Dsv4Int8LinearMethod):
            return method.dequantize(layer)
        return dequant_linear_weight(layer)

    return dequant_linear_weight_dsv4_int


PATCH = Patch(
    name="dsv4_int_cpu_wo_a_dequant",
    target="vllm.models.deepseek_v4.cpu.cpu_sparse:_dequant_linear_weight",
    signature="(layer: torch.nn.modules.module.Module) -> torch.Tensor",
    why="The CPU attention's _o_proj reads wo_a.weight directly: before wo_a's own "
    "process_weights_after_loading it snapshots `weight.float() * weight_scale_inv` (or FP8 "
    "blocks) into a BF16 bmm operand. For a dsv4_int `channel` wo_a that ignores the +128 offset "
    "of the stored bytes, so every output would be wrong.",
    how="For layers whose quant method is dsv4_int's INT8 linear method, returns that method's "
    "exact dequantization (q * scale, channel or block); other layers take the stock function. "
    "This is the same dequantize-once-to-BF16 the INT8 method's CPU path uses for every linear.",
    vllm_checked="0.32.0",
    processes=("workers",),
    remove_when="vLLM's CPU DeepSeek-V4 attention runs wo_a through its quant method (e.g. a "
    "grouped apply) instead of reading its weight.",
    replace=_replace,
)

"""INT8 W8A16 linear method for dsv4_int's dense layers (SPEC-dsv4_int.md sections 2 and 4).

Parameters carry the checkpoint's names after vLLM's DeepSeek-V4 weight mapper (`.scale` ->
`weight_scale_inv`), dtypes and shapes: `channel` uint8 [N, K] (q + 128) with BF16 [N];
`block` int8 [N, K] with BF16 [ceil(N/128), ceil(K/128)]. vLLM's own parameter classes do the
column/row/merged sharding, so each shard's scales travel with its rows.

After loading, the weight is prepared once for the path `flags.select_kernel_paths` chose:
  OURS          vllm_ampere.ops.w8a16.repack (our sm80-89 GEMM)
  MARLIN        gptq_marlin_repack(8 bit) + marlin_permute_scales (vLLM's Marlin, uint8b128)
  REFERENCE /   dequantized once to the activation dtype; apply is a BF16 matmul
  DEQUANT_BF16
Layers vLLM runs as a batch of groups (`wo_a`: layer.is_bmm, bmm_batch_size groups of rows,
each applied to its own slice of the input) are prepared per group, and `apply_grouped` runs
them; patches/ route the stock code that reads `wo_a.weight` directly to it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from vllm.logger import init_logger
from vllm.model_executor.utils import replace_parameter
from vllm.model_executor.layers.linear import LinearMethodBase, register_weight_loader_v2_supported_method
from vllm.model_executor.parameter import (BlockQuantScaleParameter, ChannelQuantScaleParameter,
                                           ModelWeightParameter)

from vllm_ampere.convert.codecs import block_grid
from vllm_ampere.flags import KernelPaths, LinearPath
from vllm_ampere.quant import reference
from vllm_ampere.quant.loading import (Dsv4IntLoadError, LoadTracker, check_tensor, checkpoint_name,
                                       loads_from_checkpoint, wrap_loader)

logger = init_logger(__name__)

BLOCK = reference.INT8_BLOCK


def _spec_tensor(strategy: str, leaf: str, n: int, k: int) -> tuple[tuple[torch.dtype, ...], tuple[int, ...], str]:
    """(dtypes, full shape, description) of a linear's `weight` or `scale` (SPEC section 2)."""
    if leaf == "weight":
        if strategy == "channel":
            return (torch.uint8,), (n, k), "INT8 channel weight, q + 128"
        return (torch.int8,), (n, k), "INT8 block weight, q"
    if strategy == "channel":
        return (torch.bfloat16,), (n,), "one scale per output row"
    return (torch.bfloat16,), block_grid(n, k), "one scale per 128x128 block"


@register_weight_loader_v2_supported_method  # our parameters are vLLM Parameter classes
class Dsv4Int8LinearMethod(LinearMethodBase):
    """W8A16 for one linear layer; `strategy` is the checkpoint's `channel` or `block`."""

    def __init__(self, strategy: str, paths: KernelPaths, prefix: str):
        self.strategy = strategy
        self.paths = paths
        self.prefix = prefix

    # -- parameters ---------------------------------------------------------------------------
    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs):
        stock_loader = extra_weight_attrs["weight_loader"]
        n = sum(output_partition_sizes)
        k = input_size_per_partition
        layer.logical_widths = output_partition_sizes
        layer.input_size_per_partition = k
        layer.output_size_per_partition = n
        layer.params_dtype = params_dtype
        weight = ModelWeightParameter(
            data=torch.empty(n, k, dtype=torch.uint8 if self.strategy == "channel" else torch.int8),
            input_dim=1, output_dim=0, weight_loader=stock_loader)
        if self.strategy == "channel":
            scale = ChannelQuantScaleParameter(data=torch.empty(n, dtype=torch.bfloat16), output_dim=0,
                                               weight_loader=stock_loader)
        else:
            # vLLM's merged/column loaders shard block scales by layer.weight_block_size.
            layer.weight_block_size = [BLOCK, BLOCK]
            grids = [block_grid(o, k) for o in output_partition_sizes]
            data = torch.empty(sum(rows for rows, _ in grids), grids[0][1], dtype=torch.bfloat16)
            scale = BlockQuantScaleParameter(data=data, input_dim=1, output_dim=0, weight_loader=stock_loader)
        layer.register_parameter("weight", weight)
        layer.register_parameter("weight_scale_inv", scale)

        merged = len(output_partition_sizes) > 1
        shards = list(range(len(output_partition_sizes))) if merged else [None]
        tracker = LoadTracker(
            {(leaf, s): checkpoint_name(self.prefix, s, leaf) for leaf in ("weight", "scale") for s in shards},
            enforce=loads_from_checkpoint())
        layer.dsv4_tracker = tracker
        wrap_loader(weight, stock_loader, tracker, lambda t, *a, **kw: self._check(layer, "weight", t, *a))
        wrap_loader(scale, stock_loader, tracker, lambda t, *a, **kw: self._check(layer, "scale", t, *a))

    def _check(self, layer, leaf: str, tensor: torch.Tensor, shard: int | None = None):
        """Validate a checkpoint tensor against the full (unsharded) shape the spec gives it."""
        n = layer.output_sizes[shard] if shard is not None else layer.output_size
        k = layer.input_size
        name = checkpoint_name(self.prefix, shard, leaf)
        try:
            check_tensor(name, tensor, *_spec_tensor(self.strategy, leaf, n, k))
        except Dsv4IntLoadError as e:
            other = "block" if self.strategy == "channel" else "channel"
            dtype, shape, _ = _spec_tensor(other, leaf, n, k)
            if tensor.dtype in dtype and tuple(tensor.shape) == shape:
                raise Dsv4IntLoadError(
                    f"{e}: it is a {other!r} tensor, but config.json's quantization_config says "
                    f"strategy {self.strategy!r} (config_groups.linears_w8a16.weights.strategy)") from None
            raise
        return tensor, (leaf, shard)

    def dequantize(self, layer: torch.nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The loaded weight as floats [N, K] (valid until process_weights_after_loading)."""
        if self.strategy == "channel":
            return reference.dequant_int8_channel(layer.weight.data, layer.weight_scale_inv.data, dtype)
        return reference.dequant_int8_block(layer.weight.data, layer.weight_scale_inv.data, dtype)

    # -- after loading --------------------------------------------------------------------------
    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        layer.dsv4_tracker.check_complete(self.prefix)
        path = self.paths.linear
        logger.info_once("dsv4_int INT8 linears: %s (%s)", path.value, "; ".join(self.paths.reasons))
        groups = getattr(layer, "bmm_batch_size", 1) if getattr(layer, "is_bmm", False) else 1
        n, k = layer.weight.shape
        if n % groups:
            raise ValueError(f"dsv4_int: {self.prefix} has {n} rows, not divisible into {groups} groups")
        layer.dsv4_groups = groups
        if path in (LinearPath.REFERENCE, LinearPath.DEQUANT_BF16):
            w = self.dequantize(layer, layer.params_dtype)
            replace_parameter(layer, "weight", w)
            del layer.weight_scale_inv
        elif path is LinearPath.OURS:
            self._prepare_ours(layer, groups)
        elif path is LinearPath.MARLIN:
            self._prepare_marlin(layer, groups)
        else:
            raise RuntimeError(f"dsv4_int: no INT8 linear path on this machine: {'; '.join(self.paths.reasons)}")

    def _prepare_ours(self, layer, groups: int) -> None:
        from vllm_ampere.ops import w8a16

        rows = layer.weight.shape[0] // groups
        packed = [w8a16.repack(layer.weight.data[g * rows:(g + 1) * rows].contiguous(),
                               layer.weight_scale_inv.data[g * rows:(g + 1) * rows].contiguous())
                  for g in range(groups)]
        replace_parameter(layer, "weight", torch.stack([p.qweight for p in packed]))  # [G, R/16, K/32, 512]
        replace_parameter(layer, "weight_scale_inv", layer.weight_scale_inv.data.view(groups, rows).contiguous())
        layer.dsv4_locks = torch.stack([p.locks for p in packed])

    def _prepare_marlin(self, layer, groups: int) -> None:
        from vllm import _custom_ops as ops
        from vllm.model_executor.layers.quantization.utils.marlin_utils import (
            marlin_make_empty, marlin_pad_qweight, marlin_pad_scales, marlin_padded_nk, marlin_permute_scales)

        from vllm_ampere.quant.marlin_layout import int8_gptq_qweight

        n, k = layer.weight.shape
        rows = n // groups
        pn, pk = marlin_padded_nk(rows, k)
        qweights, scales = [], []
        for g in range(groups):
            sl = slice(g * rows, (g + 1) * rows)
            q = marlin_pad_qweight(int8_gptq_qweight(layer.weight.data[sl]), rows, k, pn, pk)
            qweights.append(ops.gptq_marlin_repack(q, size_k=pk, size_n=pn, num_bits=8))
            s = marlin_pad_scales(layer.weight_scale_inv.data[sl].view(1, rows), rows, k, pn, pk, -1)
            scales.append(marlin_permute_scales(s, size_k=pk, size_n=pn, group_size=-1))
        replace_parameter(layer, "weight", torch.stack(qweights))
        replace_parameter(layer, "weight_scale_inv", torch.stack(scales))
        layer.dsv4_zp = marlin_make_empty(layer.weight.device)

    # -- forward --------------------------------------------------------------------------------
    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if layer.dsv4_groups != 1:
            raise RuntimeError(f"dsv4_int: {self.prefix} is a grouped (bmm) layer; call apply_grouped")
        if self.paths.linear in (LinearPath.REFERENCE, LinearPath.DEQUANT_BF16):
            return F.linear(x, layer.weight, bias)
        out = self._gemm(layer, 0, x.reshape(-1, x.shape[-1]))
        if bias is not None:
            out = out + bias
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def apply_grouped(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x [T, G, K] -> [T, G, R]: group g of the layer's rows applied to x[:, g]."""
        groups = layer.dsv4_groups
        if x.dim() != 3 or x.shape[1] != groups:
            raise ValueError(f"dsv4_int: {self.prefix} expects [T, {groups}, K] input, got {list(x.shape)}")
        if self.paths.linear in (LinearPath.REFERENCE, LinearPath.DEQUANT_BF16):
            w = layer.weight.view(groups, -1, layer.weight.shape[-1])
            return torch.bmm(x.transpose(0, 1).to(w.dtype), w.transpose(1, 2)).transpose(0, 1)
        return torch.stack([self._gemm(layer, g, x[:, g].contiguous()) for g in range(groups)], dim=1)

    def _gemm(self, layer, g: int, x2d: torch.Tensor) -> torch.Tensor:
        if self.paths.linear is LinearPath.OURS:
            from vllm_ampere.ops import w8a16

            packed = w8a16.W8A16Weight(layer.weight[g], layer.dsv4_locks[g], layer.input_size_per_partition)
            return w8a16.gemm(x2d, packed, layer.weight_scale_inv[g])
        from vllm.model_executor.layers.quantization.utils.marlin_utils import apply_gptq_marlin_linear
        from vllm.scalar_type import scalar_types

        rows = layer.output_size_per_partition // layer.dsv4_groups
        return apply_gptq_marlin_linear(
            input=x2d, weight=layer.weight[g], weight_scale=layer.weight_scale_inv[g], weight_zp=layer.dsv4_zp,
            workspace=None, wtype=scalar_types.uint8b128, output_size_per_partition=rows,
            input_size_per_partition=layer.input_size_per_partition)


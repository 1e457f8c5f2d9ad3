"""The one record behind dsv4_int_{cpu,cuda}_load_weights: the same wrap for either model class."""

from __future__ import annotations

import functools

from vllm_ampere.patching import Patch


def _replace(load_weights):
    @functools.wraps(load_weights)
    def load_weights_dsv4_int(self, weights):
        from vllm_ampere.quant.load_guard import guarded_load_weights

        return guarded_load_weights(load_weights, self, weights)

    return load_weights_dsv4_int


def load_weights_patch(name: str, model_module: str, platform: str) -> Patch:
    return Patch(
        name=name,
        target=f"{model_module}:DeepseekV4ForCausalLM.load_weights",
        signature="(self, weights: collections.abc.Iterable[tuple[str, torch.Tensor]]) -> set[str]",
        why=f"The {platform} DeepSeek-V4 model's loader meets a checkpoint tensor it has no "
        "parameter for with a bare KeyError naming only the renamed vLLM parameter, and copies "
        "INT8/INT4 bytes into a BF16/FP32 parameter with a silent cast, and vLLM's check for "
        "parameters no tensor reached runs only for unquantized models, so a dsv4_int checkpoint "
        "that disagrees with the layer classification or lacks a tensor either fails without the "
        "checkpoint's name or loads garbage.",
        how="For models whose quantization_config is dsv4_int, follows which checkpoint tensor is "
        "being loaded and raises Dsv4IntLoadError naming it and its shard file for a tensor without "
        "a parameter, for I8/U8 bytes sent to an unquantized parameter and for the stock loaders' "
        "bare shape asserts, and names every non-empty parameter outside the dsv4_int layers that "
        "no tensor reached (vllm_ampere.quant.load_guard); any other model loads as stock.",
        vllm_checked="0.32.0",
        processes=("workers",),
        remove_when="vLLM's DeepSeek-V4 load_weights reports unknown checkpoint tensors by their "
        "checkpoint name, its loaders refuse integer bytes for floating-point parameters and its "
        "loader checks quantized models for parameters no tensor reached.",
        replace=_replace,
    )

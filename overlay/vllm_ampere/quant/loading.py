"""Checked loading for dsv4_int parameters: wrong dtypes/shapes and missing tensors get errors
that name the checkpoint tensor.

vLLM's stock loaders copy with bare `assert`s (or a broadcasting `copy_`), and vLLM checks that
every parameter was loaded only for unquantized models. So each dsv4_int parameter's
weight_loader is wrapped: it checks the incoming tensor against what the spec says that
tensor is, then records what it loaded; `process_weights_after_loading` asks the tracker
whether anything is missing before it repacks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Hashable

import torch

# vLLM merges these checkpoint projections into one module (the DeepSeek-V4 models'
# stacked_params_mapping and packed_modules_mapping): vLLM module -> checkpoint names by shard.
MERGED_CHECKPOINT_NAMES = {
    "fused_wqa_wkv": ("wq_a", "wkv"),
    "gate_up_proj": ("w1", "w3"),
    "fused_wkv_wgate": ("wkv", "wgate"),
}
# vLLM renames these (WeightsMapper in the DeepSeek-V4 models).
RENAMED_CHECKPOINT_NAMES = {"down_proj": "w2"}


class Dsv4IntLoadError(ValueError):
    """A dsv4_int checkpoint tensor is missing, unexpected or not shaped as the spec says."""


def checkpoint_name(prefix: str, shard: int | None, leaf: str) -> str:
    """The checkpoint tensor name for a vLLM linear `prefix`, merged shard and leaf (weight/scale).

    "model.layers.0.attn.fused_wqa_wkv", 1, "scale" -> "layers.0.attn.wkv.scale".
    """
    parts = prefix.split(".")
    if parts[0] == "model":
        parts = parts[1:]
    last = parts[-1]
    if last in MERGED_CHECKPOINT_NAMES and shard is not None:
        parts[-1] = MERGED_CHECKPOINT_NAMES[last][shard]
    elif last in RENAMED_CHECKPOINT_NAMES:
        parts[-1] = RENAMED_CHECKPOINT_NAMES[last]
    return ".".join(parts + [leaf])


def check_tensor(name: str, tensor: torch.Tensor, dtypes: tuple[torch.dtype, ...], shape: tuple[int, ...],
                 what: str) -> None:
    """Raise Dsv4IntLoadError naming `name` unless tensor has one of `dtypes` and `shape`."""
    if tensor.dtype not in dtypes or tuple(tensor.shape) != tuple(shape):
        want = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise Dsv4IntLoadError(
            f"dsv4_int checkpoint tensor {name}: expected {want} {list(shape)} ({what}), got "
            f"{str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)}"
        )


@dataclass
class LoadTracker:
    """What one layer expects to load (keys -> checkpoint names) and what it has loaded."""

    expected: dict[Hashable, str]
    loaded: set[Hashable] = field(default_factory=set)
    enforce: bool = True  # False under --load-format dummy: nothing comes from a checkpoint

    def record(self, key: Hashable) -> None:
        self.loaded.add(key)

    def check_complete(self, layer_name: str) -> None:
        missing = [name for key, name in self.expected.items() if key not in self.loaded]
        if self.enforce and missing:
            shown = ", ".join(sorted(missing)[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            raise Dsv4IntLoadError(
                f"dsv4_int: layer {layer_name} is missing {len(missing)} checkpoint tensor(s): {shown}"
            )


def loads_from_checkpoint() -> bool:
    """False when vLLM fills weights itself (--load-format dummy); read while the model is built."""
    from vllm.config import get_current_vllm_config

    try:
        return get_current_vllm_config().load_config.load_format != "dummy"
    except Exception:  # built outside a vLLM config (unit tests of a bare layer)
        return True


def wrap_loader(param: torch.nn.Parameter, inner: Callable, tracker: LoadTracker,
                check: Callable[..., tuple[torch.Tensor, Hashable]]) -> None:
    """Make param's weight_loader run `check(loaded_weight, *args)` before the stock `inner`.

    check raises on a bad tensor and returns the tensor to load (possibly re-viewed) with the key
    to record; the key is recorded only when the stock loader accepted the tensor.
    """

    def checked_weight_loader(p, loaded_weight, *args, **kwargs):
        loaded_weight, key = check(loaded_weight, *args, **kwargs)
        result = inner(p, loaded_weight, *args, **kwargs)
        if result is not False:  # the MoE loader returns False for experts of other EP ranks
            tracker.record(key)
        return result

    checked_weight_loader.dsv4_int_checked = True
    param.weight_loader = checked_weight_loader


def is_checked_loader(loader: Callable | None) -> bool:
    """Whether `loader` is a dsv4_int parameter's checked loader (made by wrap_loader)."""
    return getattr(loader, "dsv4_int_checked", False)

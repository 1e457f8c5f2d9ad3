"""Checkpoint-level checks around DeepSeek-V4's `load_weights` for dsv4_int checkpoints.

The per-parameter checks (loading.py) only see tensors that reach a dsv4_int parameter. Two
mistakes never do, and the stock loader reports them without the checkpoint's name or not at
all: a tensor the model has no parameter for (vLLM's `params_dict[name]` KeyError, naming only
the renamed vLLM parameter) and INT8/INT4 bytes reaching a layer that SPEC section 4 keeps
BF16/FP32 (the stock loaders' `copy_` casts them silently). `guarded_load_weights` follows
which checkpoint tensor is being loaded and turns both into Dsv4IntLoadError naming it and its
shard file. After loading, a BF16/FP32 parameter that no tensor reached is refused by name
(stock vLLM checks that only for unquantized models).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from vllm_ampere.convert.source import INDEX
from vllm_ampere.quant.loading import Dsv4IntLoadError, is_checked_loader

QUANTIZED_BYTES = (torch.int8, torch.uint8)  # dsv4_int's INT4 (I8) and INT8 (U8/I8) storage


def is_dsv4_int(model: torch.nn.Module) -> bool:
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    return isinstance(qc, dict) and qc.get("quant_method") == "dsv4_int"


class CheckpointCursor:
    """Passes the checkpoint's (name, tensor) pairs through, remembering the one being loaded.

    The stock loaders consume the iterator lazily one pair at a time (AutoWeightsLoader's
    groupby reads no further ahead than the pair it hands on), so the last pair drawn is the
    one whose loading failed.
    """

    def __init__(self, weights: Iterable[tuple[str, torch.Tensor]], model_dir: str | None):
        self._weights = weights
        self.model_dir = model_dir
        self.name: str | None = None

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in self._weights:
            self.name = name
            yield name, tensor

    def shard(self) -> str | None:
        return shard_file(self.model_dir, self.name) if self.name else None

    def where(self) -> str:
        """`name` with its shard file when the checkpoint's index is on local disk."""
        shard = self.shard()
        return f"{self.name} (in {shard})" if shard else str(self.name)


def shard_file(model_dir: str | None, name: str) -> str | None:
    """The shard holding `name` by the local checkpoint's index, else None (hub ids, no index)."""
    if not model_dir or not Path(model_dir).is_dir():
        return None
    index = Path(model_dir) / INDEX
    try:
        return json.loads(index.read_text())["weight_map"].get(name)
    except (OSError, ValueError, KeyError):
        files = sorted(Path(model_dir).glob("*.safetensors"))
        return files[0].name if len(files) == 1 else None


def _refuse_quantized_bytes(param_name: str, param: torch.nn.Parameter, inner: Callable,
                            cursor: CheckpointCursor) -> Callable:
    def unquantized_weight_loader(p, loaded_weight, *args, **kwargs):
        if loaded_weight.dtype in QUANTIZED_BYTES:
            raise Dsv4IntLoadError(
                f"dsv4_int checkpoint tensor {cursor.where()}: holds "
                f"{str(loaded_weight.dtype).removeprefix('torch.')} {list(loaded_weight.shape)} but "
                f"{param_name} is unquantized {str(param.dtype).removeprefix('torch.')}: "
                "SPEC-dsv4_int.md section 4 keeps this layer BF16/FP32, so the checkpoint and the "
                "runtime's layer classification disagree (refusing to cast quantized bytes)")
        try:
            return inner(p, loaded_weight, *args, **kwargs)
        except AssertionError as e:  # the stock loaders' bare shape asserts
            raise Dsv4IntLoadError(
                f"dsv4_int checkpoint tensor {cursor.where()}: "
                f"{str(loaded_weight.dtype).removeprefix('torch.')} {list(loaded_weight.shape)} does not "
                f"fit {param_name} {list(param.shape)} ({e or 'shape check failed'})") from e

    return unquantized_weight_loader


def guarded_load_weights(load_weights: Callable, model: torch.nn.Module,
                         weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
    """Run the stock `load_weights(model, weights)` with the checks above (dsv4_int only)."""
    from vllm.model_executor.model_loader.weight_utils import default_weight_loader

    if not is_dsv4_int(model):
        return load_weights(model, weights)
    cursor = CheckpointCursor(weights, getattr(model.config, "_name_or_path", None))
    # Wrapped only for this call: the parameters' own loaders come back afterwards.
    saved = []
    for name, param in model.named_parameters():
        loader = getattr(param, "weight_loader", None)
        if not param.dtype.is_floating_point or is_checked_loader(loader):
            continue
        saved.append((param, loader))
        param.weight_loader = _refuse_quantized_bytes(name, param, loader or default_weight_loader, cursor)
    try:
        loaded = load_weights(model, cursor)
    except Dsv4IntLoadError as e:  # a dsv4_int parameter's check: it names the tensor, add its file
        shard = cursor.shard()
        if shard is None or shard in str(e):
            raise
        raise Dsv4IntLoadError(f"{e} (in {shard})") from e
    except KeyError as e:  # DeepseekV4Model.load_weights: params_dict[<mapped name>]
        raise Dsv4IntLoadError(
            f"dsv4_int: unexpected checkpoint tensor {cursor.where()}: the DeepSeek-V4 model has no "
            f"parameter for it (its loader looked up {e.args[0] if e.args else e!r})") from e
    except ValueError as e:
        # AutoWeightsLoader on a name outside every module; its message lists every parameter.
        head = str(e).split(". The available parameters", 1)[0]
        if not head.startswith("There is no module or parameter named"):
            raise
        raise Dsv4IntLoadError(f"dsv4_int: unexpected checkpoint tensor {cursor.where()}: {head}") from e
    finally:
        for param, loader in saved:
            if loader is None:
                del param.weight_loader
            else:
                param.weight_loader = loader
    _refuse_unloaded(model, loaded, cursor)
    return loaded


def _refuse_unloaded(model: torch.nn.Module, loaded: set[str] | None, cursor: CheckpointCursor) -> None:
    """A BF16/FP32 parameter no checkpoint tensor reached would serve uninitialized memory.

    Stock vLLM 0.32.0 runs this check (DefaultModelLoader.track_weights_loading) only for
    unquantized models. Exempt, as there: empty placeholders. The dsv4_int layers' parameters are
    left to their trackers (loading.py), which name the missing checkpoint tensor itself.
    """
    if loaded is None:  # a loader that does not report what it loaded: nothing to compare
        return
    tracked = {f"{name}.{p}" if name else p for name, m in model.named_modules()
               if hasattr(m, "dsv4_tracker") for p, _ in m.named_parameters(recurse=False)}
    missing = sorted(name for name, param in model.named_parameters()
                     if name not in loaded and name not in tracked and param.numel() > 0)
    if missing:
        where = cursor.model_dir or "the checkpoint"
        raise Dsv4IntLoadError(
            f"dsv4_int: {where} has no tensor for {len(missing)} parameter(s) of the DeepSeek-V4 "
            f"model, which would keep uninitialized memory: {', '.join(missing[:8])}"
            + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))

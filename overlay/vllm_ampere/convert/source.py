"""Reading and validating a native checkpoint before anything is written.

Everything the converter will rely on is checked here, and each failure names the file and
tensor: config.json is a native DeepSeek-V4-Flash; every shard header parses and fits its file;
the index and the shard headers agree; the tensor set is exactly what config.json implies (no
unknown tensor, no missing weight or scale); dtypes and shapes match; no e8m0 scale byte is 255
and no FP8 weight byte is an e4m3 NaN. (A finite code times a large scale can still leave fp32's
range; the converter finds that while decoding, and names the tensor.)
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .codecs import E4M3_NAN_BITS, E8M0_NAN
from .errors import ConversionError
from .layout import NativeTensor, native_tensors
from .safetensors_io import ShardReader

INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
ARCHITECTURE = "DeepseekV4ForCausalLM"
MODEL_TYPE = "deepseek_v4"


@dataclass
class Source:
    root: Path
    config: dict
    config_bytes: bytes
    index_bytes: bytes
    weight_map: dict[str, str]  # tensor -> shard file
    layout: dict[str, NativeTensor]
    readers: dict[str, ShardReader]  # shard file -> reader

    @property
    def shards(self) -> list[str]:
        return sorted(self.readers)

    @property
    def index_sha256(self) -> str:
        return hashlib.sha256(self.index_bytes).hexdigest()


def load_source(root: str | Path, progress: bool = False) -> Source:
    """Parse and validate the whole native checkpoint at `root`; raises ConversionError.
    `progress`: a tqdm bar over the bytes whose values are checked (scales, FP8 weights)."""
    root = Path(root)
    config_bytes = _read(root / CONFIG)
    config = _json(config_bytes, CONFIG)
    _check_config(config)
    index_bytes = _read(root / INDEX)
    index = _json(index_bytes, INDEX)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConversionError("index has no weight_map", file=INDEX)
    try:
        layout = native_tensors(config)
    except (KeyError, TypeError, IndexError) as e:
        raise ConversionError(f"config.json lacks or mistypes a DeepSeek-V4 field: {e}", file=CONFIG) from None
    readers = {f: ShardReader(root / f) for f in sorted(set(weight_map.values()))}
    src = Source(root, config, config_bytes, index_bytes, dict(sorted(weight_map.items())), layout, readers)
    _check_tensors(src)
    _check_values(src, progress)
    return src


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConversionError(f"cannot read {path}: {e.strerror}", file=path.name) from None


def _json(raw: bytes, name: str):
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"not valid JSON: {e}", file=name) from None


def _check_config(cfg: dict) -> None:
    if not isinstance(cfg, dict):
        raise ConversionError("config.json is not a JSON object", file=CONFIG)
    arch, mtype = cfg.get("architectures"), cfg.get("model_type")
    if arch != [ARCHITECTURE] or mtype != MODEL_TYPE:
        raise ConversionError(
            f"not a DeepSeek-V4 checkpoint: architectures={arch!r}, model_type={mtype!r} "
            f"(expected [{ARCHITECTURE!r}], {MODEL_TYPE!r})",
            file=CONFIG,
        )
    q = cfg.get("quantization_config") or {}
    if q.get("quant_method") == "dsv4_int":
        raise ConversionError("checkpoint is already dsv4_int", file=CONFIG)
    want = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}
    got = {k: q.get(k) for k in want}
    if got != want or cfg.get("expert_dtype", "fp4") != "fp4":
        raise ConversionError(
            f"not the native FP8 + MXFP4 format: quantization_config {got}, expert_dtype "
            f"{cfg.get('expert_dtype', 'fp4')!r} (expected {want}, 'fp4')",
            file=CONFIG,
        )


def _check_tensors(src: Source) -> None:
    for file, reader in src.readers.items():
        for name in reader.tensors:
            if src.weight_map.get(name) != file:
                raise ConversionError(f"tensor is in the shard but the index puts it in {src.weight_map.get(name)}", file=file, tensor=name)
    for name, file in src.weight_map.items():
        reader = src.readers[file]
        if name not in reader.tensors:
            raise ConversionError("the index lists this tensor but the shard does not hold it", file=file, tensor=name)
        t = src.layout.get(name)
        if t is None:
            raise ConversionError("unknown tensor: not part of DeepSeek-V4-Flash as config.json describes it", file=file, tensor=name)
        info = reader.tensors[name]
        if info.dtype not in t.dtypes:
            raise ConversionError(f"dtype {info.dtype}, expected {' or '.join(t.dtypes)}", file=file, tensor=name)
        if info.shape != t.shape:
            raise ConversionError(f"shape {list(info.shape)} does not match config.json (expected {list(t.shape)})", file=file, tensor=name)
    for name, t in src.layout.items():
        if name in src.weight_map:
            continue
        if t.kind.endswith("_scale") and t.weight_name in src.weight_map:
            raise ConversionError(f"missing scale of {t.weight_name}", file=src.weight_map[t.weight_name], tensor=name)
        raise ConversionError("missing tensor: config.json implies it, the index lacks it", file=INDEX, tensor=name)


def _check_values(src: Source, progress: bool) -> None:
    """No NaN byte in any scale or FP8 weight (about 15 GB of the full model's 160)."""
    from tqdm import tqdm

    checked = [(n, t) for n, t in src.layout.items() if t.kind.endswith("_scale") or t.kind == "fp8"]
    total = sum(src.readers[src.weight_map[n]].tensors[n].nbytes for n, _ in checked)
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="checking scales and FP8 weights",
              file=sys.stderr, dynamic_ncols=True, disable=not progress) as bar:
        for name, t in checked:
            file = src.weight_map[name]
            raw = src.readers[file].read_bytes(name)
            scale = t.kind.endswith("_scale")
            nan = raw == E8M0_NAN if scale else (raw & E4M3_NAN_BITS) == E4M3_NAN_BITS
            if bool(nan.any()):
                at = int(torch.nonzero(nan)[0])
                pos = [int(p) for p in torch.unravel_index(torch.tensor(at), t.shape)]
                what = "e8m0 scale byte 255 (NaN)" if scale else f"e4m3 NaN byte 0x{int(raw[at]):02X}"
                raise ConversionError(f"{what} at {pos}", file=file, tensor=name)
            bar.update(raw.numel())

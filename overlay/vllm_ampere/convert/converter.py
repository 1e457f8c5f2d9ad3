"""Native DeepSeek-V4-Flash (FP8 + MXFP4) -> dsv4_int, shard by shard, atomic and resumable.

Output shard i holds the converted tensors of source shard i (same names, same file names), so
the plan per output shard is: its own tensors, plus any source shard that holds one of their
weight/scale partners. A shard is written under a temporary name, fsynced and renamed; the
manifest then records its sha256, quality figures and the size and mtime of the source shards it
was made from. `resume` keeps shards whose bytes still match the manifest and whose sources are
unchanged, and redoes the rest. config.json is removed when a run starts and written
last, so a directory without it is visibly incomplete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import resource
import shutil
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import torch

from .. import __version__
from ..quant.schema import ConfigGroups, ExpertsGroup, ExpertWeights, LinearsGroup, LinearWeights, QuantizationConfig
from . import quality
from .codecs import FP8_BLOCK, decode_fp8_blocks
from .errors import ConversionError
from .int4 import DEFAULT_GRID, Int4Quantizer, grid_for_mode
from .int8 import quantize_block, quantize_channel
from .layout import bf16_linear_patterns, native_tensors, output_spec, tensor_class
from .safetensors_io import DTYPES, ShardReader, ShardWriter, write_file_atomic
from .source import CONFIG, INDEX, Source, load_source

MANIFEST = "dsv4_int_manifest.json"
QUALITY_JSON = "dsv4_int_quality.json"
QUALITY_TXT = "dsv4_int_quality.txt"
_DENSE_CHUNK_VALUES = 1 << 22  # rows of a dense weight decoded at once


@dataclass(frozen=True)
class ConvertOptions:
    scale_mode: str = "mse"  # mse | absmax7 | absmax8
    mse_grid: tuple[float, float, float] = DEFAULT_GRID
    dense_int8: str = "channel"  # channel | block
    device: str = "cpu"
    enable_imma: bool = False
    workers: int = 1
    resume: bool = False
    overwrite: bool = False
    progress: bool = True

    def fingerprint_fields(self) -> dict:
        """The options that decide output bytes (device and workers must not)."""
        return {"scale_mode": self.scale_mode, "divisors": list(grid_for_mode(self.scale_mode, self.mse_grid)),
                "dense_int8": self.dense_int8, "enable_imma": self.enable_imma}


@dataclass
class ConvertResult:
    dst: Path
    converted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    quality: dict = field(default_factory=dict)
    summary: str = ""


def convert(src: str | Path, dst: str | Path, options: ConvertOptions = ConvertOptions()) -> ConvertResult:
    """Convert the native checkpoint at `src` into a dsv4_int checkpoint at `dst`."""
    t0 = time.monotonic()
    if options.dense_int8 not in ("channel", "block"):
        raise ConversionError(f"dense_int8 must be 'channel' or 'block', got {options.dense_int8!r}")
    if options.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConversionError("--device cuda asked for, but torch sees no CUDA device")
    grid = grid_for_mode(options.scale_mode, options.mse_grid)
    source = load_source(src, options.progress)  # every check happens before DST is touched
    dst = Path(dst)
    fingerprint = _fingerprint(source, options)
    manifest = _prepare_dst(Path(src), dst, options, fingerprint)
    result = ConvertResult(dst)
    stamps = {f: _stamp(source.root / f) for f in source.shards}
    todo = []
    for file in source.shards:
        entry = manifest["shards"].get(file)
        if (entry and entry.get("sources") and all(stamps.get(f) == s for f, s in entry["sources"].items())
                and (dst / file).exists() and _sha256(dst / file) == entry["sha256"]):
            result.skipped.append(file)
        else:
            manifest["shards"].pop(file, None)
            todo.append(file)
    jobs = {file: _job(source, dst, file, options, grid) for file in todo}
    total = sum(stamps[f][0] for f in todo)  # bytes to read

    def record(file: str, entry: dict) -> None:
        # The source shards it was made from, as they were: --resume redoes it if one changed.
        entry["sources"] = {f: stamps[f] for f in sorted(set(jobs[file].inputs.values()))}
        manifest["shards"][file] = entry
        _write_manifest(dst, manifest)
        result.converted.append(file)

    with _progress(options, total, len(todo)) as bar:
        _run(list(jobs.values()), options, bar, record)
    _finish(source, dst, manifest, options, grid, result)
    result.seconds = time.monotonic() - t0
    result.peak_rss_bytes = _peak_rss()
    return result


def _fingerprint(source: Source, options: ConvertOptions) -> str:
    h = hashlib.sha256(source.index_bytes + source.config_bytes)
    h.update(json.dumps(options.fingerprint_fields(), sort_keys=True).encode())
    h.update(__version__.encode())
    return h.hexdigest()


def _prepare_dst(src: Path, dst: Path, options: ConvertOptions, fingerprint: str) -> dict:
    s, d = src.resolve(), dst.resolve()
    if d == s or s in d.parents or d in s.parents:
        raise ConversionError(f"DST {dst} must not be SRC, inside it, or contain it")
    fresh = {"format": 1, "fingerprint": fingerprint, "shards": {}}
    if dst.exists() and any(dst.iterdir()):
        if options.overwrite:
            shutil.rmtree(dst)
        elif options.resume:
            try:
                manifest = json.loads((dst / MANIFEST).read_text())
            except (OSError, json.JSONDecodeError):
                raise ConversionError(f"--resume: {dst} has no readable {MANIFEST}; not a conversion output") from None
            if manifest.get("fingerprint") != fingerprint:
                raise ConversionError(f"--resume: {dst} was converted from another source or with other options")
            (dst / CONFIG).unlink(missing_ok=True)  # incomplete again until the run ends
            return manifest
        else:
            raise ConversionError(f"{dst} exists and is not empty: pass --resume to continue it or --overwrite to replace it")
    dst.mkdir(parents=True, exist_ok=True)
    _write_manifest(dst, fresh)
    return fresh


def _write_manifest(dst: Path, manifest: dict) -> None:
    manifest["shards"] = dict(sorted(manifest["shards"].items()))
    write_file_atomic(dst / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())


def _stamp(path: Path) -> list[int]:
    """Size and modification time of a source shard (hashing ~160 GB on every resume is too slow)."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class _Job:
    src: str
    dst: str
    file: str
    names: tuple[str, ...]
    inputs: dict  # tensor -> source shard, for the job's tensors and their partners
    config: dict
    grid: tuple[float, ...]
    dense: str
    device: str
    threads: int


def _job(source: Source, dst: Path, file: str, options: ConvertOptions, grid) -> _Job:
    names = tuple(n for n, f in source.weight_map.items() if f == file)
    inputs = {}
    for n in names:
        t = source.layout[n]
        for needed in {n, t.weight_name, t.scale_name if t.kind in ("expert", "fp8") else n}:
            inputs[needed] = source.weight_map[needed]
    threads = max(1, (os.cpu_count() or 1) // max(1, options.workers))
    return _Job(str(source.root), str(dst), file, names, inputs, source.config, grid, options.dense_int8,
                options.device, threads)


def _run(jobs: list[_Job], options: ConvertOptions, bar, record) -> None:
    """Convert every job's shard, calling record(file, entry) as each one is written."""
    if options.workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            record(job.file, convert_shard(job, bar))
        return
    ctx = get_context("spawn")  # CUDA and torch threads do not survive fork
    failure = None
    with ProcessPoolExecutor(max_workers=options.workers, mp_context=ctx) as pool:
        futures = {pool.submit(convert_shard, job): job for job in jobs}
        try:
            for fut in as_completed(futures):
                job = futures[fut]
                try:
                    entry = fut.result()
                except BaseException as e:  # a shard failed (or was cancelled after one did)
                    if failure is None:
                        # Start no more shards; those already running finish and are recorded
                        # below, so that --resume keeps them. Then the first failure is raised.
                        failure = e
                        pool.shutdown(wait=False, cancel_futures=True)
                    continue
                if bar is not None:
                    bar.update(Path(job.src, job.file).stat().st_size)
                record(job.file, entry)
        except BaseException:  # Ctrl-C, or the manifest could not be written: start nothing more
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    if failure is not None:
        raise failure


_QUANTIZERS: dict = {}


def convert_shard(job: _Job, bar=None) -> dict:
    """Write one output shard; returns its manifest entry (sha256, size, quality stats)."""
    torch.set_num_threads(job.threads)
    layout = native_tensors(job.config)
    readers = {f: ShardReader(Path(job.src) / f) for f in sorted(set(job.inputs.values()))}
    specs = {n: output_spec(n, layout, job.dense, readers[job.inputs[n]].tensors[n].dtype) for n in job.names}
    out_path = Path(job.dst) / job.file
    writer = ShardWriter(out_path, specs)
    stats: quality.Stats = {}
    # A weight and its scale are written apart (sorted order); the quantized pair waits in
    # `pending` until both are out, then goes, so memory holds one tensor's result, not a shard's.
    pending: dict[str, tuple] = {}
    uses = Counter(layout[n].weight_name for n in writer.order if layout[n].kind != "keep")
    try:
        for name in writer.order:
            t = layout[name]
            reader = readers[job.inputs[name]]
            if t.kind == "keep":
                writer.write(name, reader.read_bytes(name))
            else:
                wname = t.weight_name
                if wname not in pending:
                    pending[wname] = _quantize(job, layout, readers, wname)
                weight, scale, stat = pending[wname]
                if t.kind in ("expert", "fp8"):
                    writer.write(name, weight)
                    quality.add(stats, tensor_class(name), **stat)
                else:
                    writer.write(name, scale)
                uses[wname] -= 1
                if not uses[wname]:
                    del pending[wname]
            if bar is not None:
                bar.update(reader.tensors[name].nbytes)
                bar.set_postfix_str(f"{job.file} {writer.next}/{len(writer.order)} tensors", refresh=False)
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    return {"sha256": _sha256(out_path), "bytes": out_path.stat().st_size, "quality": stats}


def _quantize(job: _Job, layout, readers, wname: str):
    t = layout[wname]
    wfile, sfile = job.inputs[wname], job.inputs[t.scale_name]
    weight = readers[wfile].read(wname)
    scale = readers[sfile].read_bytes(t.scale_name).reshape(layout[t.scale_name].shape)
    try:
        if t.kind == "expert":
            return _quantize_expert(job, weight.view(torch.uint8), scale)
        return _quantize_dense(job, weight, scale)
    except ConversionError as e:
        raise ConversionError(str(e), file=wfile, tensor=wname) from None


def _quantize_expert(job: _Job, weight: torch.Tensor, scale: torch.Tensor):
    key = (job.grid, job.device)
    if key not in _QUANTIZERS:
        _QUANTIZERS[key] = Int4Quantizer(job.grid, job.device)
    r = _QUANTIZERS[key](weight, scale)
    stat = {"values": weight.numel() * 2, "signal": _sum(r.signal), "sq_err": _sum(r.err),
            "max_abs_err": r.max_abs_err, "sq_err_absmax7": _sum(r.err_absmax7)}
    return r.weight.cpu().view(torch.int8), r.scale.cpu(), stat


def _quantize_dense(job: _Job, weight: torch.Tensor, scale: torch.Tensor):
    n, k = weight.shape
    rows = max(FP8_BLOCK, _DENSE_CHUNK_VALUES // max(1, k) // FP8_BLOCK * FP8_BLOCK)
    q_parts, s_parts = [], []
    signal = sq_err = max_err = 0.0
    for r0 in range(0, n, rows):
        w = decode_fp8_blocks(weight[r0 : r0 + rows].to(job.device), scale[r0 // FP8_BLOCK : (r0 + rows) // FP8_BLOCK + 1].to(job.device))
        if not bool(torch.isfinite(w).all()):
            raise ConversionError("FP8 weight decodes to a non-finite value")
        r = quantize_channel(w) if job.dense == "channel" else quantize_block(w)
        diff = (r.dequant - w).to(torch.float64)
        signal += _sum(w.to(torch.float64) ** 2)
        sq_err += _sum(diff * diff)
        max_err = max(max_err, float(diff.abs().max()) if diff.numel() else 0.0)
        q_parts.append(r.weight.cpu())
        s_parts.append(r.scale.cpu())
    stat = {"values": n * k, "signal": signal, "sq_err": sq_err, "max_abs_err": max_err}
    return torch.cat(q_parts), torch.cat(s_parts), stat


def _sum(x: torch.Tensor) -> float:
    """Per-row float64 sums (one thread per row), then a correctly rounded total."""
    rows = x.reshape(x.shape[0], -1) if x.dim() > 1 else x.reshape(1, -1)
    return math.fsum(rows.sum(dim=1).tolist())


def _finish(source: Source, dst: Path, manifest: dict, options: ConvertOptions, grid, result: ConvertResult) -> None:
    _copy_other_files(source.root, dst)
    layout = source.layout
    total = 0
    for name, file in source.weight_map.items():
        code, shape = output_spec(name, layout, options.dense_int8, source.readers[file].tensors[name].dtype)
        total += DTYPES[code][1] * math.prod(shape)
    index = {"metadata": {"total_size": total}, "weight_map": source.weight_map}
    write_file_atomic(dst / INDEX, (json.dumps(index, indent=2) + "\n").encode())
    header = {"scale_mode": options.scale_mode, "divisors": list(grid), "dense_int8": options.dense_int8}
    rep = quality.report(quality.merge([manifest["shards"][f]["quality"] for f in source.shards]), header)
    result.quality = rep
    result.summary = quality.summary_text(rep)
    write_file_atomic(dst / QUALITY_JSON, quality.dumps(rep))
    write_file_atomic(dst / QUALITY_TXT, result.summary.encode())
    cfg = dict(source.config)
    cfg["expert_dtype"] = "int4"
    cfg["quantization_config"] = _quantization_config(source, options, grid).to_json_dict()
    write_file_atomic(dst / CONFIG, (json.dumps(cfg, indent=2) + "\n").encode())  # last: marks completion


def _quantization_config(source: Source, options: ConvertOptions, grid) -> QuantizationConfig:
    lo, hi, step = options.mse_grid
    return QuantizationConfig(
        config_groups=ConfigGroups(
            experts_w4a16=ExpertsGroup(weights=ExpertWeights(scale_mode=options.scale_mode)),
            linears_w8a16=LinearsGroup(weights=LinearWeights(strategy=options.dense_int8)),
        ),
        ignore=bf16_linear_patterns(source.layout),
        conversion={
            "tool": "vllm-ampere-overlay convert",
            "tool_version": __version__,
            "source_index_sha256": source.index_sha256,
            "source_quantization_config": source.config.get("quantization_config"),
            "scale_mode": options.scale_mode,
            "mse_grid": f"{lo}:{hi}:{step}" if options.scale_mode == "mse" else None,
            "divisors": list(grid),
            "error_sum": "exact sum of the fp32 squared terms; ties keep the smaller divisor",
            "dense_int8": options.dense_int8,
        },
        imma=True if options.enable_imma else None,
    )


def _copy_other_files(src: Path, dst: Path) -> None:
    """Tokenizer, generation config, code, docs: everything but weights, index and config."""
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if any(p.startswith(".") for p in rel.parts) or not path.is_file():
            continue
        if path.suffix == ".safetensors" or rel.name in (INDEX, CONFIG) or path.name.endswith(".partial"):
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        write_file_atomic(dst / rel, path.read_bytes())


def _progress(options: ConvertOptions, total: int, shards: int):
    if not options.progress or total == 0:
        return contextlib.nullcontext()  # enters as None: no bar
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"converting {shards} shards",
                file=sys.stderr, dynamic_ncols=True)


def _peak_rss() -> int:
    """Peak resident bytes of this process and of its finished workers. This process's own peak
    is its memory map's high-water mark (VmHWM), not getrusage's maxrss: Linux carries the peak
    of whichever process exec'd this one into that (a conversion started from a large process
    reported its peak). A worker's maxrss is its own, as this process's map starts fresh."""
    with open("/proc/self/status") as f:
        own = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) * 1024  # both in KiB

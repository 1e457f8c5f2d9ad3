"""Converting one full-size DeepSeek-V4-Flash layer shard: wall time, bytes/s and peak memory.

    PYTHONPATH=overlay python benchmarks/bench_convert_shard.py [--dir /tmp/x] [--ratio 4] [--keep]

Writes a native checkpoint at Flash's real dimensions with one decoder layer (shard 1: that
layer, 256 MXFP4 experts + FP8 dense, about 3.5 GB like a published shard; shard 2: embedding,
head and the rest), then runs `vllm-ampere convert` on it as a user would, in a child process,
and reports its wall time, input bytes/s and peak RSS (that child's own rusage; the native
checkpoint is written by another child, because Linux carries a process's peak RSS into the
children it forks and execs). Baseline in the same run: copying the
same shards file to file (read + write of the same bytes), the I/O bound of a shard-wise
converter. The data are random codes (every e2m1 code, e8m0 exponents around 2^-7), not a
trained model: the MSE search costs the same per group either way.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from vllm_ampere.cluster.model import ModelDims
from vllm_ampere.convert.layout import native_tensors
from vllm_ampere.convert.safetensors_io import ShardWriter, dtype_code
from vllm_ampere.convert.source import INDEX
from vllm_ampere.convert.tiny import keep_tensor, tiny_config

FLASH = ModelDims()


def flash_one_layer_config(ratio: int) -> dict:
    """The tiny config's keys with Flash's dimensions, one decoder layer of compress ratio `ratio`."""
    cfg = tiny_config()
    cfg.update({k: getattr(FLASH, k) for k in (
        "hidden_size", "vocab_size", "num_attention_heads", "head_dim", "qk_rope_head_dim", "q_lora_rank",
        "o_groups", "o_lora_rank", "n_routed_experts", "n_shared_experts", "num_experts_per_tok",
        "moe_intermediate_size", "index_n_heads", "index_head_dim", "index_topk", "hc_mult", "sliding_window")})
    cfg.update(num_hidden_layers=1, num_nextn_predict_layers=0, num_hash_layers=0, compress_ratios=[ratio])
    return cfg


def random_tensor(name: str, t, cfg: dict, gen: torch.Generator) -> torch.Tensor:
    """A tensor of the native dtype and shape, cheap to make at full size."""
    if t.kind == "expert":  # packed e2m1 pairs: every byte is valid
        return torch.randint(0, 256, t.shape, generator=gen, dtype=torch.uint8).view(torch.int8)
    if t.kind == "fp8":  # e4m3 bytes without the two NaN encodings
        b = torch.randint(0, 256, t.shape, generator=gen, dtype=torch.uint8)
        return b.masked_fill_((b & 0x7F) == 0x7F, 0x7E).view(torch.float8_e4m3fn)
    if t.kind.endswith("_scale"):  # e8m0 around 2^-7
        return torch.randint(116, 124, t.shape, generator=gen, dtype=torch.uint8).view(torch.float8_e8m0fnu)
    return keep_tensor(name, t, cfg, gen)


def write_native(dst: Path, ratio: int) -> int:
    """The one-layer Flash checkpoint in `dst`; returns its tensor bytes."""
    cfg = flash_one_layer_config(ratio)
    layout = native_tensors(cfg)
    gen = torch.Generator().manual_seed(0)
    files = {True: "model-00001-of-00002.safetensors", False: "model-00002-of-00002.safetensors"}
    weight_map = {name: files[name.startswith("layers.0.")] for name in layout}
    total = 0
    for file in files.values():
        names = [n for n, f in weight_map.items() if f == file]
        specs = {n: (layout[n].dtypes[0], tuple(layout[n].shape)) for n in names}
        writer = ShardWriter(dst / file, specs)
        for n in writer.order:
            tensor = random_tensor(n, layout[n], cfg, gen)
            assert dtype_code(tensor.dtype) == specs[n][0], (n, tensor.dtype, specs[n][0])
            writer.write(n, tensor)
            total += tensor.numel() * tensor.element_size()
        writer.finish()
    (dst / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", help="work directory (default: a temporary one; needs about 18 GB)")
    parser.add_argument("--ratio", type=int, default=4, choices=(4, 128), help="the layer's compress ratio")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--write-native", metavar="DIR", help=argparse.SUPPRESS)  # the writer child
    args = parser.parse_args(argv)
    if args.write_native:
        write_native(Path(args.write_native), args.ratio)
        return 0
    work = Path(args.dir or tempfile.mkdtemp(prefix="bench-convert-shard-"))
    native, converted, copied = work / "native", work / "dsv4_int", work / "copy"
    for d in (native, copied):
        d.mkdir(parents=True, exist_ok=False)
    try:
        t = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--ratio", str(args.ratio), "--write-native", str(native)],
                       check=True)
        in_bytes = json.loads((native / INDEX).read_text())["metadata"]["total_size"]
        print(f"wrote the native one-layer checkpoint: {in_bytes / 1e9:.2f} GB in {time.perf_counter() - t:.0f} s")
        shards = sorted(native.glob("*.safetensors"))
        layer_shard = shards[0].stat().st_size

        t = time.perf_counter()
        for s in shards:
            shutil.copyfile(s, copied / s.name)
        copy_s = time.perf_counter() - t
        shutil.rmtree(copied)

        cmd = [sys.executable, "-m", "vllm_ampere.cli", "convert", str(native), str(converted)]
        t = time.perf_counter()
        child = subprocess.Popen(cmd)
        _, status, usage = os.wait4(child.pid, 0)
        convert_s = time.perf_counter() - t
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode:
            raise SystemExit(f"vllm-ampere convert failed with exit code {child.returncode}")
        peak_rss = usage.ru_maxrss * 1024  # Linux: KiB
        out_bytes = sum(p.stat().st_size for p in converted.glob("*.safetensors"))
        figures = dict(
            ratio=args.ratio, native_bytes=in_bytes, layer_shard_bytes=layer_shard, dsv4_int_bytes=out_bytes,
            convert_s=convert_s, copy_s=copy_s, convert_in_mb_s=in_bytes / convert_s / 1e6,
            copy_mb_s=in_bytes / copy_s / 1e6, of_copy=copy_s / convert_s, peak_rss_bytes=peak_rss,
            peak_rss_of_layer_shard=peak_rss / layer_shard,
            projected_flash_min=convert_s * 43 / 60,  # 43 such layers dominate the published checkpoint
        )
        print(f"layer shard {layer_shard / 1e9:.2f} GB; native {in_bytes / 1e9:.2f} GB -> dsv4_int {out_bytes / 1e9:.2f} GB")
        print(f"convert: {convert_s:.1f} s, {figures['convert_in_mb_s']:.0f} MB/s of input; file copy of the same "
              f"shards {copy_s:.1f} s ({figures['copy_mb_s']:.0f} MB/s): {figures['of_copy']:.1%} of the copy rate")
        print(f"peak RSS of the converter {peak_rss / 2**30:.2f} GiB = {figures['peak_rss_of_layer_shard']:.2f}x "
              f"the layer shard; whole model at this rate about {figures['projected_flash_min']:.0f} min")
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=1))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

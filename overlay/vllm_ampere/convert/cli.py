"""`vllm-ampere convert SRC DST`: native DeepSeek-V4-Flash -> dsv4_int (see converter.py)."""

from __future__ import annotations

import argparse
import sys

from .errors import ConversionError
from .int4 import DEFAULT_GRID

HELP = "convert a native DeepSeek-V4-Flash checkpoint (FP8 + MXFP4) to dsv4_int (INT8 + INT4)"


def _grid(text: str) -> tuple[float, float, float]:
    try:
        start, stop, step = (float(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:STOP:STEP, got {text!r}") from None
    return start, stop, step


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="native checkpoint directory (config.json, index, shards)")
    parser.add_argument("dst", help="output directory")
    parser.add_argument("--scale-mode", choices=("mse", "absmax7", "absmax8"), default="mse", help="INT4 expert scale choice")
    parser.add_argument("--mse-grid", type=_grid, default=DEFAULT_GRID, metavar="START:STOP:STEP",
                        help="divisors tried by --scale-mode mse (default 5.0:9.5:0.25, 19 divisors)")
    parser.add_argument("--dense-int8", choices=("channel", "block"), default="channel", help="INT8 scale layout of dense weights")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the arithmetic runs (same bytes either way)")
    parser.add_argument("--enable-imma", action="store_true", help="write the IMMA (INT8 tensor core) flag into quantization_config")
    parser.add_argument("--workers", type=int, default=1, help="shards converted in parallel processes (same bytes)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run: keep verified shards, redo the rest")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")


def run(args) -> int:
    from .converter import ConvertOptions, convert

    options = ConvertOptions(
        scale_mode=args.scale_mode, mse_grid=args.mse_grid, dense_int8=args.dense_int8, device=args.device,
        enable_imma=args.enable_imma, workers=args.workers, resume=args.resume, overwrite=args.overwrite,
    )
    try:
        result = convert(args.src, args.dst, options)
    except ConversionError as e:
        print(f"vllm-ampere convert: error: {e}", file=sys.stderr)
        return 2
    print(result.summary, end="")
    print(f"converted {len(result.converted)} shards, kept {len(result.skipped)} verified ones; "
          f"{result.seconds:.1f} s, peak RSS {result.peak_rss_bytes / 2**30:.2f} GiB -> {result.dst}")
    return 0

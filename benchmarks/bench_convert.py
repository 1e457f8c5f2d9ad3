"""Converter benchmark: values/s of the fast MSE path vs the slow reference loop vs a plain
memory copy (the bound), on the same random MXFP4 data, and the projected time for the whole
DeepSeek-V4-Flash expert set (~277e9 values) on this machine.

    PYTHONPATH=overlay python benchmarks/bench_convert.py [--values 33554432] [--ref-groups 256]
        [--device cuda --compare-cpu]

The copy bound copies --copy-mb of expert bytes (weight + e8m0 scale, 17/32 byte per value),
far more than L2/L3, so it measures memory bandwidth rather than a cache-resident copy (on the
quantizer's device). On a GPU the fast path's time includes moving the input there, as in the
converter. --compare-cpu checks that the device gives the CPU's results, field by field, on the
benchmark data and on groups at every e8m0 byte.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "unit"))
import convert_reference as ref  # noqa: E402

from vllm_ampere.convert.int4 import Int4Quantizer, grid_for_mode  # noqa: E402

EXPERT_VALUES = 43 * 256 * 3 * 2048 * 4096  # routed experts of the 43 layers: 2.77e11
BYTES_PER_VALUE = 0.5 + 1 / 32  # a nibble plus a 32nd of the e8m0 byte


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _sync(t: torch.Tensor) -> None:
    if t.is_cuda:
        torch.cuda.synchronize(t.device)


def compare_with_cpu(quant, weight: torch.Tensor, scale: torch.Tensor) -> int:
    """Raises unless quant (on its device) gives the CPU quantizer's results; returns values compared."""
    gen = torch.Generator().manual_seed(1)
    u = torch.randint(0, 255, (1024, 64), dtype=torch.uint8, generator=gen)
    u.view(-1)[:255] = torch.arange(255, dtype=torch.uint8)  # every e8m0 byte
    w = torch.randint(0, 256, (1024, 1024), dtype=torch.uint8, generator=gen)
    w = torch.where((u >= 253).repeat_interleave(16, 1), w & 0x33, w)  # |code| <= 1: finite at the top
    cpu = Int4Quantizer(quant.grid, "cpu")
    for wt, sc in ((weight, scale), (w, u)):
        got, want = quant(wt, sc), cpu(wt, sc)
        for f in ("weight", "scale", "err", "err_absmax7", "signal"):
            a, b = getattr(got, f).cpu(), getattr(want, f)
            if not torch.equal(a.view(torch.int16) if f == "scale" else a, b.view(torch.int16) if f == "scale" else b):
                raise SystemExit(f"{quant.device} and cpu differ in {f} ({int((a != b).sum())} of {a.numel()})")
        if got.max_abs_err != want.max_abs_err:
            raise SystemExit(f"{quant.device} and cpu differ in max_abs_err: {got.max_abs_err} != {want.max_abs_err}")
    return weight.numel() * 2 + w.numel() * 2


def expert_data(values: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random MXFP4 rows of 4096 values with realistic scale bytes (weights ~N(0, 0.02): 116..125)."""
    gen = torch.Generator().manual_seed(seed)
    rows = max(1, values // 4096)
    weight = torch.randint(0, 256, (rows, 2048), dtype=torch.uint8, generator=gen)
    scale = torch.randint(116, 126, (rows, 128), dtype=torch.uint8, generator=gen)
    return weight, scale


def measure(quant, weight, scale, ref_groups: int, copy_mb: int, repeat: int = 3) -> dict:
    quant(weight[:8], scale[:8])  # warm-up
    n = weight.numel() * 2
    fast_s = _best(lambda: quant(weight, scale), repeat)
    src = torch.randint(0, 256, (copy_mb << 20,), dtype=torch.uint8).to(quant.device)
    dst = torch.empty_like(src)
    copy_s = _best(lambda: (dst.copy_(src), _sync(dst)), 5)
    ref_rows = max(1, ref_groups // 128)
    w, s = weight[:ref_rows].numpy(), scale[:ref_rows].numpy()
    ref_s = _best(lambda: ref.quantize_experts(w, s, list(quant.grid)), 1)
    ref_values = ref_rows * 4096
    fast, reference, copy = n / fast_s, ref_values / ref_s, src.numel() / BYTES_PER_VALUE / copy_s
    return {
        "values": n,
        "fast_values_per_s": fast,
        "reference_values_per_s": reference,
        "copy_values_per_s": copy,
        "copy_bytes": src.numel(),
        "fast_over_reference": fast / reference,
        "fast_over_copy": fast / copy,
        "projected_expert_set_s": EXPERT_VALUES / fast,
        "projected_expert_set_copy_s": EXPERT_VALUES / copy,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--values", type=int, default=1 << 25, help="expert values for the fast path")
    p.add_argument("--ref-groups", type=int, default=256, help="groups of 32 for the reference loop")
    p.add_argument("--copy-mb", type=int, default=512, help="bytes copied for the bound (well beyond L3)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--chunk-values", type=int, default=None, help="Int4Quantizer chunk (default: its own)")
    p.add_argument("--compare-cpu", action="store_true", help="check the device's results against the CPU's")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    weight, scale = expert_data(args.values)
    kw = {} if args.chunk_values is None else {"chunk_values": args.chunk_values}
    quant = Int4Quantizer(grid_for_mode("mse"), args.device, **kw)
    out = {"device": args.device, "threads": torch.get_num_threads(), "chunk_values": quant.chunk_groups * 32}
    out.update(measure(quant, weight, scale, args.ref_groups, args.copy_mb))
    if args.compare_cpu:
        out["identical_to_cpu_values"] = compare_with_cpu(quant, weight, scale)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

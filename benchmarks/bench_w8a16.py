"""Benchmark the W8A16 GEMM on the DeepSeek-V4-Flash INT8 shapes.

    PYTHONPATH=overlay python benchmarks/bench_w8a16.py [--json out.json] [--quick]

Reports per (shape, M): our time, achieved GB/s of weight reading (N*K bytes / time) and its
ratio to the measured device-to-device copy bandwidth (bytes read + written / time) and to the
same-size read floor (torch's sum over the same N*K bytes, timed the same way: what a plain
streaming kernel reaches at this size, where launch and ramp-up weigh on a small weight), and the
times of (a) dequant + torch.matmul in BF16 (dequantized by torch ops on every call), (b) the
cuBLAS matmul alone on a pre-dequantized BF16 weight (a floor, not a real option: it needs 2x
the memory), (c) vLLM's in-tree Marlin W8A16 (uint8b128, per-channel) where vLLM is importable.

Timing: CUDA graphs of a batch of calls (as vLLM decodes), each call on another copy of the
weights so that the set is several times the L2 and every call reads DRAM; median of replays.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from gpu_timing import copy_bandwidth, graph_s, read_bandwidth
from vllm_ampere.ops import w8a16
from vllm_ampere.ops.w8a16 import DSV4_FLASH_SHAPES

MS = (1, 2, 4, 8, 16, 32, 64, 512, 2048)
ROTATE_BYTES = 512 << 20  # weight copies per shape: at least this much, >> the 50-60 MB L2s


def marlin_runner():
    """vLLM's Marlin W8A16 (uint8b128, channel) as gemm(a) callables, or None with the reason."""
    try:
        from vllm import _custom_ops as ops
        from vllm.model_executor.layers.quantization.utils.marlin_utils import marlin_make_workspace_new
        from vllm.model_executor.layers.quantization.utils.marlin_utils_test import marlin_quantize
        from vllm.scalar_type import scalar_types
    except Exception as e:  # vLLM absent, or a build without the CUDA ops
        return None, f"vLLM Marlin not available here ({type(e).__name__}: {e})"

    def make(w_u8, scale):  # vLLM 0.32 API: marlin_quantize -> [w_ref, q_w, s]; ops.marlin_gemm
        n, k = w_u8.shape
        w_ref = ((w_u8.float() - 128) * scale.float()[:, None]).T.to(torch.bfloat16)  # [K, N]
        _, q_w, s = marlin_quantize(w_ref, scalar_types.uint8b128, -1)
        ws = marlin_make_workspace_new(w_u8.device)
        return lambda a: ops.marlin_gemm(
            a, None, q_w, None, s, None, None, None, ws, scalar_types.uint8b128, a.shape[0], n, k
        )

    return make, "vLLM Marlin"


def bench_shape(name, n, k, ms, marlin, bw):
    copies = max(2, min(64, ROTATE_BYTES // (n * k)))
    g = torch.Generator(device="cuda").manual_seed(0)
    ws = [torch.randint(1, 256, (n, k), generator=g, dtype=torch.uint8, device="cuda") for _ in range(copies)]
    scales = [(torch.rand(n, generator=g, device="cuda") * 1e-2 + 1e-4).to(torch.bfloat16) for _ in ws]
    packed = [w8a16.repack(w, s) for w, s in zip(ws, scales)]
    read_floor = graph_s([lambda w=w: w.view(torch.int64).sum() for w in ws])
    rows = []
    for m in ms:
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        paths = {}
        for path in ("auto", "fused", "dequant"):
            paths[path] = graph_s([lambda p=p, s=s: w8a16.gemm(a, p, s, path=path) for p, s in zip(packed, scales)])
        ours = paths["auto"]
        deq = graph_s(
            [lambda w=w, s=s: a @ ((w.to(torch.bfloat16) - 128) * s[:, None]).T for w, s in zip(ws, scales)]
        )
        # cuBLAS alone: fewer copies (2 bytes per weight); still past the L2.
        wb = [((w.to(torch.bfloat16) - 128) * s[:, None]) for w, s in zip(ws[: max(2, copies // 2)], scales)]
        cublas = graph_s([lambda w=w: a @ w.T for w in wb])
        del wb
        row = dict(shape=name, n=n, k=k, m=m, ours_us=ours * 1e6, fused_us=paths["fused"] * 1e6,
                   ours_dequant_us=paths["dequant"] * 1e6,
                   weight_gbs=n * k / ours / 1e9, of_copy_bw=n * k / ours / bw[0], of_read_bw=n * k / ours / bw[1],
                   read_floor_us=read_floor * 1e6, of_read_floor=read_floor / ours,
                   dequant_matmul_us=deq * 1e6, cublas_only_us=cublas * 1e6,
                   tflops=2 * m * n * k / ours / 1e12)  # fmt: skip
        if marlin:
            try:
                runners = [marlin(w, s) for w, s in zip(ws[:copies], scales)]
                row["marlin_us"] = graph_s([lambda r=r: r(a) for r in runners]) * 1e6
            except Exception as e:
                row["marlin_us"] = None
                row["marlin_error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
        print(
            f"{name:40s} M={m:5d} ours {row['ours_us']:8.1f} us  {row['weight_gbs']:7.0f} GB/s "
            f"({row['of_copy_bw'] * 100:5.1f}% copy bw, {row['of_read_floor'] * 100:5.1f}% same-size read)  fused {row['fused_us']:8.1f}  ours-dequant {row['ours_dequant_us']:8.1f}  "
            f"deq+mm {row['dequant_matmul_us']:8.1f}  cublas {row['cublas_only_us']:8.1f}"
            + (f"  marlin {row['marlin_us']:.1f}" if row.get("marlin_us") else ""),
            flush=True,
        )
    return rows


def sweep_split_k(n, k, m, bw):
    """Time the fused kernel at several split-K counts (tuning kTargetCtasPerSm)."""
    copies = max(2, min(64, ROTATE_BYTES // (n * k)))
    ws = [torch.randint(1, 256, (n, k), dtype=torch.uint8, device="cuda") for _ in range(copies)]
    scale = torch.full((n,), 1e-3, dtype=torch.bfloat16, device="cuda")
    packed = [w8a16.repack(w, scale) for w in ws]
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    out = {}
    for split in (0, 1, 2, 4, 8, 16, 32):
        t = graph_s([lambda p=p: w8a16.gemm(a, p, scale, path="fused", split_k=split) for p in packed])
        out["auto" if split == 0 else str(split)] = round(n * k / t / bw[0] * 100, 1)
    print(f"split-K sweep N={n} K={k} M={m}: % of copy bw {out}", flush=True)
    return dict(n=n, k=k, m=m, pct_copy_bw=out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--quick", action="store_true", help="M in 1, 16, 2048 only")
    args = parser.parse_args()
    if not torch.cuda.is_available() or not w8a16.extension_available():
        print("needs a CUDA GPU and the built vllm_ampere._C", file=sys.stderr)
        return 2
    os.environ.setdefault(w8a16.FORCE_ENV, "1")  # newer GPUs run the sm_80 PTX
    props = torch.cuda.get_device_properties(0)
    bw = copy_bandwidth(), read_bandwidth()
    print(f"{props.name} ({props.multi_processor_count} SMs, sm_{props.major}{props.minor}), copy "
          f"bandwidth {bw[0] / 1e9:.0f} GB/s (read + write), read bandwidth {bw[1] / 1e9:.0f} GB/s")  # fmt: skip
    marlin, marlin_note = marlin_runner()
    print(marlin_note if marlin is None else "vLLM Marlin: available")
    ms = (1, 16, 2048) if args.quick else MS
    rows = [r for name, (n, k) in DSV4_FLASH_SHAPES.items() for r in bench_shape(name, n, k, ms, marlin, bw)]
    sweeps = [sweep_split_k(n, k, m, bw) for (n, k) in ((1536, 4096), (4096, 8192), (1024, 4096)) for m in (1, 16)]
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=props.name, copy_bw_gbs=bw[0] / 1e9, read_bw_gbs=bw[1] / 1e9, marlin=marlin_note, rows=rows, sweeps=sweeps), f, indent=1)


def print_table(rows):
    print("\n| shape | N x K | M | ours us | weight GB/s | % copy bw | % read bw | % same-size read | fused us | our dequant+cuBLAS us "
          "| torch dequant+matmul us | cuBLAS-only us | Marlin us |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        marlin = f"{r['marlin_us']:.1f}" if r.get("marlin_us") else "n/a"
        print(f"| {r['shape']} | {r['n']}x{r['k']} | {r['m']} | {r['ours_us']:.1f} | {r['weight_gbs']:.0f} | "
              f"{r['of_copy_bw'] * 100:.1f} | {r['of_read_bw'] * 100:.1f} | {r['of_read_floor'] * 100:.1f} | {r['fused_us']:.1f} | {r['ours_dequant_us']:.1f} | "
              f"{r['dequant_matmul_us']:.1f} | {r['cublas_only_us']:.1f} | {marlin} |")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())

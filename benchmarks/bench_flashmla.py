"""Benchmark of the sm80 sparse-MLA kernels: decode latency and achieved bytes/s against the
bytes-moved bound, prefill throughput, each beside the torch reference fallback in the same run.

  PYTHONPATH=overlay python benchmarks/bench_flashmla.py [--batches 1,2,4,6,16,64] [--json F] [--md F]

Decode moves, per query, its selected KV rows (584 B each: 448 e4m3 + 128 B RoPE + 8 scale
bytes, one read each), q and the bf16 output; the fp32 split partials are extra traffic that
the bound leaves out. The bound is that byte count over the copy bandwidth measured in the
same run (a device-to-device copy, read + write counted). Decode is timed twice: replayed from
a CUDA graph over copies of the caches that together exceed the L2 (how vLLM decodes: the
GPU time; the bound and speed-up use it), and eagerly with CUDA events around the Python call
(host-side work and both launches included, which dominate at small batches). Prefill is timed
eagerly (gpu_timing.py).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from gpu_timing import copy_bandwidth, eager_s, graph_s
from vllm_ampere.attention.reference import sparse_mla as ref
from vllm_ampere.ops import flashmla

H, D = 64, 512
ROTATE_BYTES = 256 << 20  # KV cache copies per decode row, together several times the L2


def paged(num_blocks: int, block_size: int, gen) -> torch.Tensor:
    stride = block_size * ref.TOKEN_BYTES + 576
    cache = torch.zeros(num_blocks * stride, dtype=torch.uint8, device="cuda").as_strided(
        (num_blocks, block_size, ref.TOKEN_BYTES), (stride, ref.TOKEN_DATA_BYTES, 1))
    slots = torch.arange(num_blocks * block_size, device="cuda")
    ref.insert_fp8_ds_mla(cache, block_size, slots,
                          torch.randn(slots.numel(), D, generator=gen, device="cuda").to(torch.bfloat16))
    return cache


def bench_decode(batch: int, window: int, topk: int, bw: float, gen) -> dict:
    def caches():
        win = paged(4 * batch, 64, gen)  # a 256-token window region per request
        cmp = paged(max(64, 16 * batch), 64, gen)  # 1k compressed tokens (4k context at C4) per request
        return win, cmp

    win, cmp = caches()
    q = torch.randn(batch, 1, H, D, generator=gen, device="cuda").to(torch.bfloat16)
    wi = torch.randint(0, win.shape[0] * 64, (batch, 1, window), generator=gen, device="cuda", dtype=torch.int32)
    ci = torch.randint(0, cmp.shape[0] * 64, (batch, 1, topk), generator=gen, device="cuda", dtype=torch.int32)
    sink = torch.randn(H, generator=gen, device="cuda")

    def call(backend, win=win, cmp=cmp):
        return lambda: flashmla.flash_mla_with_kvcache(
            q, win.unsqueeze(-2), None, None, 512, None, softmax_scale=D ** -0.5, is_fp8_kvcache=True,
            indices=wi, attn_sink=sink, extra_k_cache=cmp.unsqueeze(-2), extra_indices_in_kvcache=ci,
            backend=backend)

    copies = max(2, ROTATE_BYTES // (win.numel() + cmp.numel()))
    rotated = [(win, cmp)] + [caches() for _ in range(copies - 1)]
    s_graph = graph_s([call("cuda", w, c) for w, c in rotated])
    del rotated
    s_eager = eager_s(call("cuda"), 50, warmup=2)
    s_ref = eager_s(call("torch"), 3, warmup=1)
    entries = window + topk
    moved = batch * (entries * ref.TOKEN_BYTES + 2 * H * D * 2)
    flops = batch * 2 * 2 * H * D * entries
    return dict(kind="decode", batch=batch, entries=entries, us=s_graph * 1e6, eager_us=s_eager * 1e6,
                ref_us=s_ref * 1e6, speedup=s_ref / s_graph, gbps=moved / s_graph / 1e9, bound_us=moved / bw * 1e6,
                of_bound=(moved / bw) / s_graph, tflops=flops / s_graph / 1e12)


def bench_prefill(s_q: int, width: int, gen) -> dict:
    s_kv = 4096 + s_q
    q = torch.randn(s_q, H, D, generator=gen, device="cuda").to(torch.bfloat16)
    kv = torch.randn(s_kv, 1, D, generator=gen, device="cuda").to(torch.bfloat16)
    idx = torch.randint(0, s_kv, (s_q, 1, width), generator=gen, device="cuda", dtype=torch.int32)
    sink = torch.randn(H, generator=gen, device="cuda")

    def call(backend):
        return lambda: flashmla.flash_mla_sparse_fwd(q, kv, idx, D ** -0.5, attn_sink=sink, backend=backend)

    s_ours = eager_s(call("cuda"), 10, warmup=2)
    s_ref = eager_s(call("torch"), 2, warmup=1)
    flops = s_q * 2 * 2 * H * D * width
    return dict(kind="prefill", s_q=s_q, entries=width, us=s_ours * 1e6, ref_us=s_ref * 1e6, speedup=s_ref / s_ours,
                tflops=flops / s_ours / 1e12)


def markdown(rows: list[dict], bw: float, device: str) -> str:
    out = [f"Device: {device}; measured copy bandwidth {bw / 1e9:.0f} GB/s.", "",
           "| decode batch | entries/query | ours, graph (us) | ours, eager (us) | torch ref (us) | speed-up | GB/s | bound (us) | of bound | TFLOP/s |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["kind"] == "decode":
            out.append(f"| {r['batch']} | {r['entries']} | {r['us']:.1f} | {r['eager_us']:.1f} | {r['ref_us']:.0f} | {r['speedup']:.0f}x | "
                       f"{r['gbps']:.0f} | {r['bound_us']:.1f} | {r['of_bound']:.0%} | {r['tflops']:.1f} |")
    out += ["", "| prefill queries | entries/query | ours (us) | torch ref (us) | speed-up | TFLOP/s |",
            "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["kind"] == "prefill":
            out.append(f"| {r['s_q']} | {r['entries']} | {r['us']:.0f} | {r['ref_us']:.0f} | {r['speedup']:.0f}x | {r['tflops']:.1f} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,2,4,6,16,64")
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--topk", type=int, default=512)
    parser.add_argument("--prefill", default="1024,4096")
    parser.add_argument("--json")
    parser.add_argument("--md")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or not flashmla.extension_available():
        print("needs a CUDA GPU and the built vllm_ampere._flashmla_C", file=sys.stderr)
        return 2
    gen = torch.Generator(device="cuda").manual_seed(0)
    bw = copy_bandwidth()
    rows = [bench_decode(int(b), args.window, args.topk, bw, gen) for b in args.batches.split(",")]
    rows += [bench_prefill(int(s), args.window + args.topk, gen) for s in args.prefill.split(",")]
    device = f"{torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})"
    table = markdown(rows, bw, device)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=device, copy_bandwidth=bw, rows=rows), f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

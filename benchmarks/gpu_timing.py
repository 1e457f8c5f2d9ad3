"""Timing and bandwidth ceilings shared by the kernel benchmarks (CUDA only).

Two clocks: `eager_s` times a Python call with CUDA events, host work included (what an eager
caller pays); `graph_s` replays a CUDA graph of many calls, as vLLM runs decode, so host work
drops out and only the GPU time per call remains. Give `graph_s` calls over different copies
of the data when the data fits in L2, or it measures L2 instead of DRAM.
"""

from __future__ import annotations

import statistics
from typing import Callable, Sequence

import torch

CEILING_BYTES = 1 << 31  # 2 GiB: far past every L2


def eager_s(fn: Callable[[], object], reps: int = 20, warmup: int = 5) -> float:
    """Median seconds of fn() by CUDA events, after warm-up calls (lazy init, PTX JIT, clocks)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def graph_s(calls: Sequence[Callable[[], object]], replays: int = 10) -> float:
    """Median seconds per call of a CUDA graph holding every callable of `calls` once."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in calls[:2]:
            c()  # warm-up outside the capture: lazy init, PTX JIT, cuBLAS handles
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(calls))
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes/s of a 2 GiB device-to-device copy, bytes read + written. Eager: a copy captured in
    a graph becomes a copy-engine node, which an H200 ran at about 2.7 TB/s instead of 4.2."""
    src = torch.empty(CEILING_BYTES, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    return 2 * CEILING_BYTES / eager_s(lambda: dst.copy_(src))


def read_bandwidth() -> float:
    """Bytes/s of summing 2 GiB (bytes read)."""
    words = torch.empty(CEILING_BYTES // 8, dtype=torch.int64, device="cuda").random_()
    return CEILING_BYTES / eager_s(lambda: words.sum())

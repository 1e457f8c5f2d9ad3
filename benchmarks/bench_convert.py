"""Converter benchmark: values/s of the fast MSE path vs the slow reference loop vs a plain
memory copy of the same bytes (the bound), on the same random MXFP4 data, and the projected time
for the whole DeepSeek-V4-Flash expert set (~277e9 values) on this machine.

    PYTHONPATH=overlay python benchmarks/bench_convert.py [--values 8388608] [--ref-groups 256]
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


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--values", type=int, default=1 << 23, help="expert values for the fast path and the copy")
    p.add_argument("--ref-groups", type=int, default=256, help="groups of 32 for the reference loop")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    gen = torch.Generator().manual_seed(0)
    rows = args.values // 4096
    weight = torch.randint(0, 256, (rows, 2048), dtype=torch.uint8, generator=gen)
    # Realistic exponents: weights ~N(0, 0.02) give e8m0 bytes around 118..124.
    scale = torch.randint(116, 126, (rows, 128), dtype=torch.uint8, generator=gen)
    quant = Int4Quantizer(grid_for_mode("mse"), args.device)
    quant(weight[:8], scale[:8])  # warm-up
    n = rows * 4096
    fast_s = _best(lambda: quant(weight, scale), 3)
    copy_s = _best(lambda: (weight.clone(), scale.clone()), 5)
    g = args.ref_groups
    ref_s = _best(lambda: ref.quantize_experts(weight[: g // 128 or 1].numpy(), scale[: g // 128 or 1].numpy(), list(quant.grid)), 1)
    ref_values = (g // 128 or 1) * 4096
    out = {
        "threads": torch.get_num_threads(),
        "values": n,
        "fast_values_per_s": n / fast_s,
        "reference_values_per_s": ref_values / ref_s,
        "copy_values_per_s": n / copy_s,
        "fast_over_reference": (n / fast_s) / (ref_values / ref_s),
        "fast_over_copy": (n / fast_s) / (n / copy_s),
        "projected_expert_set_s": EXPERT_VALUES / (n / fast_s),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

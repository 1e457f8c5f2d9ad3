"""PNG plots of a benchmark: TPOT and prefill tok/s/stream against context, one line per
concurrency, the published rows as reference markers (same colour per C, one marker shape per
published variant). Measured rows that did not pass are listed under each plot."""

from __future__ import annotations

from pathlib import Path

from vllm_ampere.bench.runner import RowResult

PLOTS = (
    ("tpot_mean_ms", "TPOT mean (ms)", "tpot.png"),
    ("prefill_tok_s_stream", "Prefill tok/s/stream (input tokens / TTFT)", "prefill.png"),
)
_VARIANT_MARKERS = {"fp4_fp8": "s", "int4_int8": "D"}


def plot_report(results: list[RowResult], published: list[dict], out_dir: Path) -> list[str]:
    """Write one PNG per entry of PLOTS into `out_dir`; return their paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    concurrencies = sorted({r.concurrency for r in results} | {p["concurrency"] for p in published})
    colours = {c: plt.get_cmap("tab10")(i % 10) for i, c in enumerate(concurrencies)}
    paths = []
    for key, label, filename in PLOTS:
        fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
        for c in concurrencies:
            mine = sorted(
                ((r.measured_input_tokens or r.input_tokens, getattr(r, key)) for r in results
                 if r.concurrency == c and r.result == "pass" and getattr(r, key) is not None)
            )  # fmt: skip
            if mine:
                xs, ys = zip(*mine)
                ax.plot(xs, ys, "-o", color=colours[c], label=f"measured C={c}")
            for variant, marker in _VARIANT_MARKERS.items():
                pts = [(p["input_tokens"], p[key]) for p in published
                       if p["variant"] == variant and p["concurrency"] == c and p[key] is not None]  # fmt: skip
                if pts:
                    xs, ys = zip(*sorted(pts))
                    ax.scatter(xs, ys, marker=marker, facecolors="none", edgecolors=colours[c], s=60,
                               label=f"published {variant} C={c}")  # fmt: skip
        not_passed = [f"{r.context} C={r.concurrency} {r.result}" for r in results if r.result != "pass"]
        if not_passed:
            fig.text(0.01, 0.01, "measured, not passed: " + ", ".join(not_passed), fontsize=8, color="crimson")
        ax.set_xscale("log")
        ax.set_yscale("log")
        # Plain numbers on log axes; contexts as the tables write them (1k, 16k, 200k).
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1000:g}k" if v >= 1000 else f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if str(f"{v:g}")[0] in "25" else ""))
        ax.set_xlabel("input tokens per request (context)")
        ax.set_ylabel(label)
        ax.set_title(f"{label.split(' (')[0]} against context")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
        fig.tight_layout(rect=(0, 0.04 if not_passed else 0, 1, 1))
        path = Path(out_dir) / filename
        fig.savefig(path)
        plt.close(fig)
        paths.append(str(path))
    return paths

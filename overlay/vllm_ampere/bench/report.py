"""The benchmark report: JSON of every row, Markdown in the seed's columns beside the published
rows with ratios, and the plots.

The published rows are the seed card's tables (seed_matrix.csv beside this file, linked from
benchmarks/): prefill tok/s/stream = input tokens / TTFT mean, decode tok/s/stream =
1000 / TPOT mean (ms), and "vLLM output tok/s" is vLLM's own aggregate output throughput.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vllm_ampere.bench.runner import RowResult

PUBLISHED_CSV = Path(__file__).with_name("seed_matrix.csv")
NUMERIC = ("ttft_mean_s", "prefill_tok_s_stream", "tpot_mean_ms", "decode_tok_s_stream", "vllm_output_tok_s")


def load_published(path: Path = PUBLISHED_CSV) -> list[dict]:
    """The published rows as dicts with RowResult's keys (plus `variant`); blanks are None."""
    lines = [l for l in Path(path).read_text().splitlines() if l.strip() and not l.startswith("#")]
    rows = []
    for raw in csv.DictReader(lines):
        row = {
            "variant": raw["variant"],
            "context": raw["context"],
            "concurrency": int(raw["concurrency"]),
            "input_tokens": int(raw["input_tokens"]),
            "result": raw["result"],
        }
        row |= {k: float(raw[k]) if raw[k].strip() else None for k in NUMERIC}
        rows.append(row)
    return rows


def _na(fmt: Callable[[float], str]) -> Callable[[object], str]:
    return lambda v: "n/a" if v is None or v == "" else fmt(v)


@dataclass(frozen=True)
class Column:
    key: str
    header: str
    fmt: Callable[[object], str]


# The seed's INT4/INT8 table, column for column and number format for number format.
SEED_COLUMNS = (
    Column("context", "Context", str),
    Column("concurrency", "C", str),
    Column("input_tokens", "Input tokens", _na(lambda v: f"{round(v):,}")),
    Column("result", "Result", lambda v: "OOM" if v == "oom" else str(v)),
    Column("ttft_mean_s", "TTFT mean", _na(lambda v: f"{v:.2f} s")),
    Column("prefill_tok_s_stream", "Prefill tok/s/stream", _na(lambda v: f"{v:.1f}")),
    Column("tpot_mean_ms", "TPOT mean", _na(lambda v: f"{v:.2f} ms")),
    Column("decode_tok_s_stream", "Decode-only tok/s/stream", _na(lambda v: f"{v:.2f}")),
    Column("vllm_output_tok_s", "vLLM output tok/s", _na(lambda v: f"{v:.2f}")),
)


def _line(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown_table(rows: list[dict], columns=SEED_COLUMNS) -> str:
    lines = [_line([c.header for c in columns]), "|" + "---|" * len(columns)]
    lines += [_line([c.fmt(row.get(c.key)) for c in columns]) for row in rows]
    return "\n".join(lines)


def measured_row(res: RowResult) -> dict:
    """A result as a table row: the input tokens vLLM measured where it has them."""
    row = res.as_dict()
    if res.measured_input_tokens is not None:
        row["input_tokens"] = res.measured_input_tokens
    return row


def matching_published(res: RowResult, published: list[dict]) -> list[dict]:
    return [p for p in published if (p["context"], p["concurrency"]) == (res.context, res.concurrency)]


def _ratio(a, b) -> str:
    return f"{a / b:.2f}×" if a is not None and b else "n/a"


def comparison_table(results: list[RowResult], published: list[dict]) -> str | None:
    """Each measured row, then each published row of the same context and C, then the ratio
    measured / published of every numeric column."""
    columns = (Column("run", "Run", str),) + SEED_COLUMNS
    assert tuple(c.key for c in columns[-len(NUMERIC):]) == NUMERIC  # ratio cells follow this order
    lines = markdown_table([], columns).splitlines()
    header_lines = len(lines)
    for res in results:
        mine = measured_row(res) | {"run": "measured"}
        pubs = matching_published(res, published)
        if pubs:
            lines.append(_line([c.fmt(mine.get(c.key)) for c in columns]))
        for p in pubs:
            lines.append(_line([c.fmt((p | {"run": f"published {p['variant']}"}).get(c.key)) for c in columns]))
            ratios = [_ratio(mine.get(k), p.get(k)) for k in NUMERIC]
            lines.append(_line([f"ratio vs {p['variant']}", res.context, str(res.concurrency), "", "", *ratios]))
    return "\n".join(lines) if len(lines) > header_lines else None


def _details(results: list[RowResult]) -> list[str]:
    out = []
    for r in results:
        if r.result == "pass":
            continue
        out.append(f"- **{r.context} C={r.concurrency}: {r.result}**: {r.reason}")
        if r.metrics:
            out.append(f"  - metrics seen: `{json.dumps(r.metrics)}`")
        if r.log_tail:
            out.append("  - last log lines:\n\n```\n" + "\n".join(r.log_tail[-15:]) + "\n```")
    return out


def _cache_hits(results: list[RowResult]) -> list[str]:
    """Each row's prefix-cache hit rate, as the seed card gives it (its rows: 0.0%)."""
    pct = lambda x: "n/a" if x is None else f"{x * 100:.1f}%"  # noqa: E731
    cells = [f"{r.context} C={r.concurrency} {pct(r.prefix_cache_hit_rate)}"
             + ("" if r.external_prefix_cache_hit_rate is None else f" (external {pct(r.external_prefix_cache_hit_rate)})")
             for r in results if r.prefix_cache_hit_rate is not None or r.external_prefix_cache_hit_rate is not None]
    if not cells:
        return []
    hit = any((r.prefix_cache_hit_rate or 0) > 0 or (r.external_prefix_cache_hit_rate or 0) > 0 for r in results)
    warn = " Rows with hits served part of their prompts from a cache: their TTFT is not comparable." if hit else ""
    return [f"Prefix-cache hit rate of the prompt tokens (published rows: 0.0%): {', '.join(cells)}.{warn}", ""]


def render_markdown(results: list[RowResult], published: list[dict], meta: dict, plots: list[str]) -> str:
    parts = ["# Random-prefix serving benchmark", ""]
    parts += [f"- {k}: `{v}`" for k, v in meta.items()]
    parts += [
        "",
        "Prefill tok/s/stream = input tokens / TTFT mean; decode-only tok/s/stream = 1000 / TPOT "
        "mean (ms), per active stream; vLLM output tok/s is vLLM's aggregate output throughput.",
        "",
        "## Measured",
        "",
        markdown_table([measured_row(r) for r in results]),
        "",
        *_cache_hits(results),
    ]
    comparison = comparison_table(results, published)
    parts += ["## Beside the published rows", ""]
    if comparison:
        parts += [
            "Published: DeepSeek-V4-Flash on RTX 3090 nodes, PP=10, TP=1 (seed card). "
            "Ratio = measured / published (TTFT and TPOT: lower is better; the others: higher).",
            "",
            comparison,
            "",
        ]
    else:
        parts += ["No measured row has a published row of the same context and concurrency.", ""]
    details = _details(results)
    if details:
        parts += ["## Rows that did not pass", "", *details, ""]
    if plots:
        parts += ["## Plots", "", *[f"![{Path(p).stem}]({Path(p).name})" for p in plots], ""]
    return "\n".join(parts)


def write_report(results: list[RowResult], out_dir: Path, meta: dict, published: list[dict] | None = None) -> dict:
    """Write report.json, report.md and the plots into `out_dir`; return their paths."""
    from vllm_ampere.bench.plots import plot_report

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    published = load_published() if published is None else published
    try:
        plots = plot_report(results, published, out_dir)
    except ImportError as e:  # installed without its dependencies (the image: pip --no-deps)
        plots, meta = [], meta | {"plots": f"not drawn: {e}"}
    data = {
        "meta": meta,
        "rows": [r.as_dict() | {"published": matching_published(r, published)} for r in results],
    }
    paths = {"json": out_dir / "report.json", "markdown": out_dir / "report.md"}
    paths["json"].write_text(json.dumps(data, indent=2) + "\n")
    paths["markdown"].write_text(render_markdown(results, published, meta, plots))
    return paths | {"plots": plots}

"""The report: the published rows rendered in the seed's own table format, the comparison beside
measured rows with ratios, report files and plots."""

from __future__ import annotations

import dataclasses
import json

import pytest

from vllm_ampere.bench.report import (
    NUMERIC,
    SEED_COLUMNS,
    comparison_table,
    load_published,
    markdown_table,
    write_report,
)
from vllm_ampere.bench.runner import RowResult

# Verbatim from the seed card (shared/seeds/000_8a4afba63399e7a1.txt): the INT4/INT8 table ...
SEED_INT4_TABLE = """\
| Context | C | Input tokens | Result | TTFT mean | Prefill tok/s/stream | TPOT mean | Decode-only tok/s/stream | vLLM output tok/s |
|---|---|---|---|---|---|---|---|---|
| 1k | 1 | 1,000 | pass | 3.10 s | 322.1 | 34.09 ms | 29.33 | 24.94 |
| 16k | 1 | 15,488 | pass | 15.55 s | 995.7 | 34.48 ms | 29.00 | 15.43 |
| 16k | 2 | 15,488 | stalled | n/a | n/a | n/a | n/a | n/a |
| 32k | 1 | 31,488 | failed | n/a | n/a | n/a | n/a | n/a |"""
# ... and the FP4/FP8 one, which has no vLLM output column and says "Decode" without "-only".
SEED_FP4_TABLE = """\
| Context | C | Input tokens | Result | TTFT mean | Prefill tok/s/stream | TPOT mean | Decode tok/s/stream |
|---|---|---|---|---|---|---|---|
| 16k | 1 | 15,872 | pass | 15.78 s | 1005.7 | 61.61 ms | 16.23 |
| 16k | 2 | 15,872 | pass | 21.11 s | 751.8 | 72.64 ms | 13.77 |
| 16k | 4 | 15,872 | pass | 31.97 s | 496.5 | 93.50 ms | 10.70 |
| 32k | 1 | 32,256 | pass | 27.03 s | 1193.1 | 62.18 ms | 16.08 |
| 32k | 2 | 32,256 | pass | 38.33 s | 841.6 | 83.77 ms | 11.94 |
| 32k | 4 | 32,256 | pass | 60.99 s | 528.9 | 128.00 ms | 7.81 |
| 64k | 1 | 65,024 | pass | 51.14 s | 1271.4 | 62.93 ms | 15.89 |
| 64k | 2 | 65,024 | pass | 73.59 s | 883.6 | 107.88 ms | 9.27 |
| 64k | 4 | 65,024 | pass | 121.81 s | 533.8 | 198.18 ms | 5.05 |
| 200k | 1 | 199,488 | OOM | n/a | n/a | n/a | n/a |"""


def _variant(variant):
    return [p for p in load_published() if p["variant"] == variant]


def test_published_int4_rows_render_as_the_seed_table():
    assert markdown_table(_variant("int4_int8")) == SEED_INT4_TABLE


def test_published_fp4_rows_render_as_the_seed_table():
    columns = [
        dataclasses.replace(c, header="Decode tok/s/stream") if c.key == "decode_tok_s_stream" else c
        for c in SEED_COLUMNS
        if c.key != "vllm_output_tok_s"
    ]
    assert markdown_table(_variant("fp4_fp8"), columns) == SEED_FP4_TABLE


def test_published_derived_columns_follow_the_seed_formulas():
    # prefill = input / TTFT and decode = 1000 / TPOT, within the card's rounding of TTFT.
    for p in load_published():
        if p["result"] == "pass":
            assert p["prefill_tok_s_stream"] == pytest.approx(p["input_tokens"] / p["ttft_mean_s"], rel=2e-3)
            assert p["decode_tok_s_stream"] == pytest.approx(1000 / p["tpot_mean_ms"], abs=0.006)
        else:
            assert all(p[k] is None for k in NUMERIC)


def _measured(context="16k", c=1, **kw) -> RowResult:
    values = dict(ttft_mean_s=10.0, prefill_tok_s_stream=1548.8, tpot_mean_ms=40.0,
                  decode_tok_s_stream=25.0, vllm_output_tok_s=20.0, measured_input_tokens=15488.0)  # fmt: skip
    values |= kw
    return RowResult(context, c, 15488, 512, "pass", **values)


def test_comparison_puts_both_published_variants_and_ratios_beside_a_row():
    table = comparison_table([_measured()], load_published()).splitlines()
    assert table[0].startswith("| Run | Context | C | Input tokens | Result |")
    assert table[2] == "| measured | 16k | 1 | 15,488 | pass | 10.00 s | 1548.8 | 40.00 ms | 25.00 | 20.00 |"
    assert table[3].startswith("| published fp4_fp8 | 16k | 1 | 15,872 | pass | 15.78 s |")
    # ratio = measured / published: 10.00 / 15.78, 1548.8 / 1005.7, 40 / 61.61, 25 / 16.23; no
    # published vLLM output tok/s for fp4_fp8.
    assert table[4] == "| ratio vs fp4_fp8 | 16k | 1 |  |  | 0.63× | 1.54× | 0.65× | 1.54× | n/a |"
    assert table[5].startswith("| published int4_int8 | 16k | 1 | 15,488 | pass | 15.55 s |")
    assert table[6] == "| ratio vs int4_int8 | 16k | 1 |  |  | 0.64× | 1.56× | 1.16× | 0.86× | 1.30× |"
    assert len(table) == 7


def test_comparison_of_a_stalled_row_and_rows_without_a_published_twin():
    stalled = RowResult("16k", 2, 15488, 512, "stalled", reason="no new token for 300 s")
    table = comparison_table([stalled, _measured("256", 1)], load_published()).splitlines()
    assert "| measured | 16k | 2 | 15,488 | stalled | n/a | n/a | n/a | n/a | n/a |" in table
    assert "| ratio vs int4_int8 | 16k | 2 |  |  | n/a | n/a | n/a | n/a | n/a |" in table
    assert not any("| 256 |" in line for line in table)
    assert comparison_table([_measured("256", 1)], load_published()) is None


def test_write_report_files(tmp_path):
    stalled = RowResult("16k", 2, 15488, 512, "stalled", reason="no new token for 300 s with 2 request(s) running",
                        metrics={"last": {"vllm:num_requests_running": 2.0, "vllm:generation_tokens_total": 1.0}})  # fmt: skip
    oom = RowResult("200k", 1, 199488, 512, "oom", reason="server log: torch.OutOfMemoryError: CUDA out of memory",
                    log_tail=["torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 114.00 MiB"])  # fmt: skip
    results = [_measured("1k", 1, measured_input_tokens=1000.0, prefix_cache_hit_rate=0.0),
               _measured(prefix_cache_hit_rate=0.5, external_prefix_cache_hit_rate=0.0), stalled, oom]
    paths = write_report(results, tmp_path, {"server": "http://127.0.0.1:8080"})
    data = json.loads(paths["json"].read_text())
    assert [r["result"] for r in data["rows"]] == ["pass", "pass", "stalled", "oom"]
    assert [p["variant"] for p in data["rows"][1]["published"]] == ["fp4_fp8", "int4_int8"]
    assert data["rows"][2]["metrics"]["last"]["vllm:generation_tokens_total"] == 1.0
    md = paths["markdown"].read_text()
    assert "| 1k | 1 | 1,000 | pass | 10.00 s |" in md
    assert "| 200k | 1 | 199,488 | OOM | n/a |" in md
    assert "**16k C=2: stalled**" in md and '"vllm:num_requests_running": 2.0' in md
    assert "Tried to allocate 114.00 MiB" in md
    assert ("hit rate of the prompt tokens (published rows: 0.0%): 1k C=1 0.0%, 16k C=1 50.0% (external 0.0%). "
            "Rows with hits served part of their prompts from a cache") in md
    assert "![tpot](tpot.png)" in md and "![prefill](prefill.png)" in md
    for p in paths["plots"]:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"

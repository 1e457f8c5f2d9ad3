"""`vllm-ampere bench` end to end, the `make demo` path: the tiny DeepSeek-V4-Flash made and
converted to dsv4_int by our CLI (conftest's tiny_checkpoints, shared with the serve tests), a
real `vllm serve` of it (CPU build, our plugin) started by the bench CLI, a small matrix through
the real `vllm bench serve`, the server stopped, and a report with every column filled and every
row `pass`."""

from __future__ import annotations

import json
import uuid

import psutil
import pytest

from conftest import assert_rows_pass, run_bench
from vllm_ampere.bench.report import NUMERIC

# The seed's command shape (seed card, "Command shape"), flag for flag.
SEED_SHAPE = [
    "--backend openai", "--endpoint /v1/completions", "--dataset-name random",
    "--random-prefix-len 0", "--request-rate inf", "--ignore-eos", "--temperature 0",
    "--percentile-metrics ttft,tpot,itl,e2el",
]  # fmt: skip


@pytest.fixture(scope="module")
def bench_run(tiny_checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_cli") / "out"
    # Every process the run starts inherits this mark (vLLM's engine and workers retitle
    # themselves, so their command lines do not show the model).
    mark = f"bench-e2e-{uuid.uuid4().hex}"
    proc = run_bench(tiny_checkpoints["dsv4_int"], out, "--max-model-len 4096 --max-num-seqs 4", "256,1k",
                     "--stall-timeout", "60", "--poll", "0.5", env={"VLLM_AMPERE_TEST_MARK": mark})
    return proc, out, mark


def test_every_row_passes_with_every_column(bench_run):
    proc, out, _ = bench_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((out / "report.json").read_text())["rows"]
    assert_rows_pass(rows, [("256", 1), ("256", 2), ("1k", 1), ("1k", 2)])
    for r in rows:
        for key in NUMERIC:
            assert isinstance(r[key], float) and r[key] > 0, (key, r)
        assert r["prefill_tok_s_stream"] == pytest.approx(r["measured_input_tokens"] / r["ttft_mean_s"])
        assert r["decode_tok_s_stream"] == pytest.approx(1000.0 / r["tpot_mean_ms"])


def test_client_ran_in_the_seed_command_shape(bench_run):
    _, out, _ = bench_run
    for log in sorted((out / "rows").glob("*.client.log")):
        cmd = log.read_text().splitlines()[0]
        assert "bench serve" in cmd
        for flag in SEED_SHAPE:
            assert flag in cmd, (flag, cmd)
        context, c = log.name.split(".")[0].split("-c")
        tokens = {"256": 256, "1k": 1000}[context]  # 1k: the matrix's (and the seed's) 1,000
        assert f"--random-input-len {tokens} " in cmd and f"--num-prompts {c} " in cmd
        assert f"--max-concurrency {c} " in cmd and "--random-output-len 16 " in cmd


def test_markdown_and_plots(bench_run):
    proc, out, _ = bench_run
    md = (out / "report.md").read_text()
    measured = md.split("## Measured")[1].split("##")[0]
    lines = [l for l in measured.splitlines() if l.startswith("| 256 |") or l.startswith("| 1k |")]
    assert len(lines) == 4
    for line in lines:
        assert "n/a" not in line and "| pass |" in line, line
    # 1k C=1 has a published twin (the seed's INT4/INT8 1k row): shown beside it with ratios.
    beside = md.split("## Beside the published rows")[1].split("## Plots")[0]
    assert "| published int4_int8 | 1k | 1 | 1,000 | pass | 3.10 s | 322.1 | 34.09 ms | 29.33 | 24.94 |" in beside
    ratio = next(l for l in beside.splitlines() if l.startswith("| ratio vs int4_int8 | 1k | 1 |"))
    assert "n/a" not in ratio and ratio.count("×") == 5, ratio
    assert "| Context | C | Input tokens | Result | TTFT mean |" in proc.stdout  # table printed
    for name in ("tpot.png", "prefill.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def _environ(p: psutil.Process) -> dict:
    try:
        return p.environ()
    except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
        return {}


def test_server_stopped_and_nothing_left(bench_run):
    proc, out, mark = bench_run
    log = (out / "server.log").read_text()
    assert "Application startup complete" in log and "started vllm serve" in proc.stdout
    left = [p for p in psutil.process_iter() if _environ(p).get("VLLM_AMPERE_TEST_MARK") == mark]
    assert not left, [(p.pid, p.name()) for p in left]


def test_a_server_that_cannot_start_fails_every_row_once(tmp_path):
    # A model vLLM cannot load: `vllm serve` exits while starting. Every row is `failed` with
    # the server's last log lines, the start is not retried per row, and the exit code says so.
    model = tmp_path / "bad"
    model.mkdir()
    (model / "config.json").write_text('{"architectures": ["NopeForCausalLM"], "model_type": "nope"}')
    out = tmp_path / "out"
    proc = run_bench(model, out, "", "256", timeout_s=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = json.loads((out / "report.json").read_text())["rows"]
    assert [r["result"] for r in rows] == ["failed", "failed"]
    assert all(r["reason"] == "vllm serve did not start" and r["log_tail"] for r in rows)
    assert "model type `nope`" in "\n".join(rows[0]["log_tail"])  # vLLM's own words, from its log
    assert proc.stdout.count("started vllm serve") == 1

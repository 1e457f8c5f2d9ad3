"""Running the matrix: one `vllm bench serve` per row, watched, ending pass/stalled/failed/oom.

Per row the runner starts the real client in the seed's command shape (client_command), then
loops until the client exits: it stops the row as `failed`/`oom` when the server dies, as
`stalled` when the watchdog fires, as `failed` past the row timeout; the client is stopped by
its own process group in every case, so a row never hangs.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vllm_ampere.bench.matrix import MatrixRow
from vllm_ampere.bench.metrics import EXTERNAL_PREFIX_CACHE, PREFIX_CACHE, cache_counters, hit_rate, scrape
from vllm_ampere.bench.processes import (
    Server,
    ServerError,
    find_oom,
    start_owned,
    stop_owned,
    tail,
    vllm_command,
)
from vllm_ampere.bench.watchdog import StallWatch


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass(frozen=True)
class WatchConfig:
    stall_timeout_s: float = 300.0  # no new token while requests run (after the first token)
    min_prefill_tok_s: float = 200.0  # sets the first-token allowance, see first_token_timeout
    poll_s: float = 2.0  # /metrics scrape period
    row_timeout_s: float = 7200.0  # hard bound on one row, whatever the metrics say

    def first_token_timeout(self, row: MatrixRow) -> float:
        """Allowance before a row's first token: the stall timeout plus the time to prefill
        every prompt of the row at `min_prefill_tok_s` (prefill shows no progress in /metrics).
        The default rate is a tenth of the seed's slowest aggregate prefill (64k C=4: 4 x 65,024
        tokens in a 122 s mean TTFT, ~2,100 tok/s), so 200k C=4 gets ~70 minutes."""
        return self.stall_timeout_s + row.input_tokens * row.concurrency / self.min_prefill_tok_s


@dataclass
class RowResult:
    context: str
    concurrency: int
    input_tokens: int  # requested (--random-input-len)
    output_tokens: int
    result: str  # pass | stalled | failed | oom
    reason: str | None = None
    ttft_mean_s: float | None = None
    prefill_tok_s_stream: float | None = None  # input tokens per request / TTFT mean
    tpot_mean_ms: float | None = None
    decode_tok_s_stream: float | None = None  # 1000 / TPOT mean (ms)
    vllm_output_tok_s: float | None = None  # vLLM's aggregate output-token throughput
    measured_input_tokens: float | None = None  # vLLM's total_input_tokens / completed
    completed: int | None = None
    failed_requests: int | None = None
    seconds: float | None = None
    result_json: str | None = None
    client_log: str | None = None
    prefix_cache_hit_rate: float | None = None  # share of the row's prompt tokens from vLLM's prefix cache
    external_prefix_cache_hit_rate: float | None = None  # from a KV connector (LMCache)
    metrics: dict | None = None  # what the watchdog saw (stalled rows)
    log_tail: list[str] = field(default_factory=list)  # server log (failed/oom rows)

    @classmethod
    def failed(cls, row: MatrixRow, reason: str | None = None) -> RowResult:
        """A row's result until it passes."""
        return cls(row.context, row.concurrency, row.input_tokens, row.output_tokens, "failed", reason)

    def as_dict(self) -> dict:
        return asdict(self)


def client_command(
    row: MatrixRow,
    base_url: str,
    model_id: str,
    result_dir: Path,
    result_filename: str,
    tokenizer: str | None = None,
    extra: list[str] = (),
    seed_base: int = 0,
) -> list[str]:
    """`vllm bench serve` exactly as the seed ran it (seed card, "Command shape"), plus saving
    the result JSON (with per-request errors, so a failed row can say why) and a seed of the
    row's own: with the client's default seed every row draws the same first prompt offsets,
    so a longer row's prompts would start with a shorter row's and hit vLLM's prefix cache
    (the random dataset builds prompts as (offset + i) % vocab: vllm/benchmarks/datasets/
    datasets.py, RandomDataset), which --random-prefix-len 0 is meant to rule out. `seed_base`
    (one per run) keeps a second run against the same server from replaying the first's prompts."""
    cmd = vllm_command(
        "bench", "serve",
        "--backend", "openai",
        "--base-url", base_url,
        "--endpoint", "/v1/completions",
        "--model", model_id,
        "--dataset-name", "random",
        "--random-input-len", str(row.input_tokens),
        "--random-output-len", str(row.output_tokens),
        "--random-prefix-len", "0",
        "--num-prompts", str(row.concurrency),
        "--max-concurrency", str(row.concurrency),
        "--request-rate", "inf",
        "--ignore-eos",
        "--temperature", "0",
        "--percentile-metrics", "ttft,tpot,itl,e2el",
        "--seed", str(zlib.crc32(f"{seed_base}/{row.name}".encode())),
        "--save-result", "--save-detailed",
        "--result-dir", str(result_dir),
        "--result-filename", result_filename,
    )  # fmt: skip
    if tokenizer:
        cmd += ["--tokenizer", tokenizer]
    return cmd + list(extra)


def _from_result_json(res: RowResult, data: dict) -> None:
    """Fill the seed's columns from vLLM's result JSON (vllm/benchmarks/serve.py, benchmark())."""
    res.completed = int(data.get("completed", 0))
    res.failed_requests = int(data.get("failed", 0))
    if res.completed:
        res.measured_input_tokens = data["total_input_tokens"] / res.completed
        res.ttft_mean_s = data["mean_ttft_ms"] / 1000.0
        res.tpot_mean_ms = data["mean_tpot_ms"]
        res.vllm_output_tok_s = data["output_throughput"]
        if res.ttft_mean_s > 0:
            res.prefill_tok_s_stream = res.measured_input_tokens / res.ttft_mean_s
        if res.tpot_mean_ms > 0:
            res.decode_tok_s_stream = 1000.0 / res.tpot_mean_ms


def _request_errors(data: dict) -> str:
    errors = sorted({e.strip().splitlines()[-1] for e in data.get("errors") or [] if e and e.strip()})
    return "; ".join(errors[:3])


def shortfall(row: MatrixRow, data: dict) -> str | None:
    """Why the requests of vLLM's result JSON `data` fall short of the row, or None when every
    one of them brought its tokens. vLLM's client counts a stream that the server cut short (an
    error chunk after a 200, as when the engine dies) as a success; with --ignore-eos every
    request must bring exactly the asked number of tokens. A failed request's output_lens entry
    is 0 and its errors entry says why (vllm/benchmarks/serve.py, calculate_metrics)."""
    errors = data.get("errors") or []
    lens = data.get("output_lens") or []
    short = [n for n, e in itertools.zip_longest(lens, errors[: len(lens)]) if not e and n != row.output_tokens]
    failed, completed = int(data.get("failed", 0)), int(data.get("completed", 0))
    why = []
    if failed:
        detail = _request_errors(data)
        why.append(f"{failed} of {row.concurrency} request(s) failed" + (f": {detail}" if detail else ""))
    if short:
        why.append(f"{len(short)} of {row.concurrency} stream(s) ended early: {short} of {row.output_tokens} tokens")
    if not why and completed != row.concurrency:
        why.append(f"{completed} of {row.concurrency} request(s) completed")
    return "; ".join(why) or None


def run_row(
    row: MatrixRow,
    server: Server,
    model_id: str,
    out_dir: Path,
    watch: WatchConfig,
    tokenizer: str | None = None,
    bench_args: list[str] = (),
    seed_base: int = 0,
) -> RowResult:
    """Run one row to its end; the client is never left running."""
    res = RowResult.failed(row)
    rows_dir = out_dir / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    result_path = rows_dir / f"{row.name}.json"
    client_log = rows_dir / f"{row.name}.client.log"
    result_path.unlink(missing_ok=True)
    res.client_log = str(client_log)
    log_start = server.log_offset()
    t0 = time.monotonic()

    if not server.alive():
        res.reason = f"server at {server.base_url} is not running at the start of the row"
        return _finish_dead_server(res, server, log_start, t0)

    cmd = client_command(row, server.base_url, model_id, rows_dir, result_path.name, tokenizer, bench_args, seed_base)
    client_log.write_text(" ".join(cmd) + "\n")
    cache_before = cache_counters(server.base_url)
    client = start_owned(cmd, client_log)
    sw = StallWatch(watch.stall_timeout_s, watch.first_token_timeout(row))
    last_note = t0
    try:
        while client.poll() is None:
            if server.owned and not server.alive():
                res.reason = f"vllm serve exited with code {server.proc.returncode} during the row"
                return _finish_dead_server(res, server, log_start, t0)
            sample = scrape(server.base_url, timeout_s=min(10.0, max(2.0, watch.poll_s)))
            if not sample.ok and not server.owned and not server.alive():
                res.reason = f"server at {server.base_url} stopped answering: {sample.error}"
                return _finish_dead_server(res, server, log_start, t0)
            stall = sw.observe(sample)
            if stall is not None:
                res.result, res.reason, res.metrics = "stalled", stall.reason, stall.metrics
                res.log_tail = tail(server.log_path, 20, log_start) if server.log_path else []
                return res
            now = time.monotonic()
            if now - t0 > watch.row_timeout_s:
                res.reason = f"row timeout: still running after {watch.row_timeout_s:.0f} s"
                res.metrics = sw.snapshot(sample)
                return res
            if now - last_note >= 30:
                last_note = now
                say(f"  {row.name}: {now - t0:.0f} s, {sample.as_dict() or sample.error}")
            time.sleep(watch.poll_s)
    finally:
        if client.poll() is None:
            stop_owned(client, grace_s=5)
        res.seconds = round(time.monotonic() - t0, 1)

    if result_path.is_file():
        data = json.loads(result_path.read_text())
        res.result_json = str(result_path)
        _from_result_json(res, data)
        cache_after = cache_counters(server.base_url)
        res.prefix_cache_hit_rate = hit_rate(cache_before, cache_after, PREFIX_CACHE)
        res.external_prefix_cache_hit_rate = hit_rate(cache_before, cache_after, EXTERNAL_PREFIX_CACHE)
        res.reason = shortfall(row, data) or (None if res.ttft_mean_s else "no TTFT in vLLM's result")
        if res.reason is None and (not server.owned or server.alive()):
            res.result = "pass"
            return res
        if server.owned and server.proc is not None:
            try:  # a dying server cuts the streams first and exits a moment later
                server.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        if server.owned and not server.alive():
            res.reason = f"vllm serve exited with code {server.proc.returncode}" + (f"; {res.reason}" if res.reason else "")
            return _finish_dead_server(res, server, log_start, t0)
    else:
        res.reason = f"vllm bench serve exited with code {client.returncode} and no result JSON"
        res.log_tail = tail(client_log, 20)
    return _with_server_log(res, server, log_start)


def _finish_dead_server(res: RowResult, server: Server, log_start: int, t0: float) -> RowResult:
    res.seconds = round(time.monotonic() - t0, 1)
    return _with_server_log(res, server, log_start)


def _with_server_log(res: RowResult, server: Server, log_start: int) -> RowResult:
    """A row that did not pass: the server log's last lines of the row (unless the client's
    are there already) and `oom` where the log shows an out-of-memory error."""
    if server.log_path:
        res.log_tail = res.log_tail or tail(server.log_path, 40, log_start)
        oom = find_oom(server.log_path, log_start)
        if oom:
            res.result, res.reason = "oom", f"{res.reason}; server log: {oom}"
    return res


def run_matrix(
    rows: list[MatrixRow],
    server: Server,
    out_dir: Path,
    watch: WatchConfig,
    tokenizer: str | None = None,
    bench_args: list[str] = (),
    on_row=None,
    seed_base: int = 0,
) -> list[RowResult]:
    """Run every row in order. An owned server is started first, restarted before a row when
    it died or after a stall (its stuck requests would hold the next row), and always stopped."""
    results: list[RowResult] = []
    model_id = None
    start_error: ServerError | None = None  # the same arguments would fail again: no retry
    start_log = 0  # where the failed start's lines begin in the server log
    try:
        for i, row in enumerate(rows, 1):
            if server.owned and not server.alive() and start_error is None:
                if server.starts:
                    say("vllm serve is down: restarting it for the next row")
                start_log = server.log_offset()
                try:
                    server.start(progress=say)
                except ServerError as e:
                    start_error = e
            if start_error is not None:
                res = RowResult.failed(row, "vllm serve did not start")
                res.log_tail = str(start_error).splitlines()[-30:]
                if find_oom(server.log_path, start_log):
                    res.result = "oom"
                say(f"[{i}/{len(rows)}] {row.context} C={row.concurrency}: {res.result} ({res.reason})")
                results.append(res)
                if on_row:
                    on_row(results)
                continue
            if model_id is None and server.alive():
                model_id = server.model_id()
            say(
                f"[{i}/{len(rows)}] {row.context} C={row.concurrency}: input {row.input_tokens}, "
                f"output {row.output_tokens}"
            )
            res = run_row(row, server, model_id or "", out_dir, watch, tokenizer, bench_args, seed_base)
            say(f"[{i}/{len(rows)}] {row.context} C={row.concurrency}: {res.result}"
                + (f" ({res.reason})" if res.reason else ""))
            results.append(res)
            if on_row:
                on_row(results)
            if server.owned and res.result == "stalled":
                server.stop()
    finally:
        server.stop()
    return results

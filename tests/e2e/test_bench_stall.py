"""The watchdog against real stalls of a real `vllm serve` (CPU build, tiny Llama):

- an engine frozen with SIGSTOP after its first tokens: the API server keeps answering
  /metrics with requests running and no new token (the seed's 16k C=2 row). The row must be
  named `stalled` within the configured time, the client stopped, nothing left running;
- the same server resumed and targeted by URL (`--base-url`): the next row passes;
- an engine killed during a row: the server exits; the row must be `failed` with its log lines.
One server for the module, in that order.
"""

from __future__ import annotations

import os
import threading
import time

import psutil
import pytest
from _tiny_llama import write_tiny_llama

from vllm_ampere.bench.matrix import MatrixRow
from vllm_ampere.bench.metrics import scrape
from vllm_ampere.bench.processes import Server
from vllm_ampere.bench.runner import WatchConfig, run_row

STALL_S = 8.0
POLL_S = 0.5
# Outputs far longer than a freeze needs (~1.3 ms a token a stream here: over a minute of
# decode), so that the engine is frozen mid-row even where its first tokens are seen late: a CI
# run once saw 2 x 12000 tokens finish before the freeze (the row is frozen or killed within
# seconds of its first token, so the length costs no time).
ROW = MatrixRow("256", 256, 2, 60000)
MAX_LEN = 65536
SERVE_ARGS = ["--max-model-len", str(MAX_LEN), "--max-num-seqs", "4", "--enforce-eager"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_stall")
    model = write_tiny_llama(root / "tiny", max_position_embeddings=MAX_LEN)
    srv = Server(
        model=str(model),
        serve_args=SERVE_ARGS,
        log_path=root / "server.log",
        env=os.environ | {"VLLM_CPU_KVCACHE_SPACE": "1"},
        startup_timeout_s=300,
    )
    srv.start()
    yield srv
    srv.stop()


def _run_in_thread(server: Server, out_dir, watch: WatchConfig):
    box: dict = {}
    model_id = server.model_id()
    t = threading.Thread(target=lambda: box.update(res=run_row(ROW, server, model_id, out_dir, watch)))
    t.start()
    return t, box


def _after_first_tokens(server: Server, baseline: float, timeout_s: float = 120) -> str:
    """Wait until the row's requests run and tokens come out (the seed's stall state); return
    how that took, for the messages of the checks that follow. Not always both streams: on a
    loaded machine vLLM's client may start the second one late."""
    t0 = time.monotonic()
    scrapes, errors = 0, []
    while True:
        s = scrape(server.base_url, timeout_s=2)
        scrapes += 1
        if s.error:
            errors.append(s.error)
        if s.ok and s.generated > baseline and s.running >= 1:
            return f"first tokens seen after {time.monotonic() - t0:.1f} s, {scrapes} scrapes, failed: {errors[-3:]}"
        assert time.monotonic() - t0 < timeout_s, f"no token within {timeout_s} s: {s}; failed scrapes: {errors[-3:]}"
        time.sleep(0.02)


def _processes_using(path) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline", "status"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if str(path) in cmd and p.info["status"] != psutil.STATUS_ZOMBIE:
            out.append(p)
    return out


def test_frozen_engine_is_stalled_and_client_stopped(server, tmp_path):
    watch = WatchConfig(stall_timeout_s=STALL_S, poll_s=POLL_S, row_timeout_s=240)
    baseline = scrape(server.base_url).generated
    thread, box = _run_in_thread(server, tmp_path, watch)
    seen = _after_first_tokens(server, baseline)
    engine = psutil.Process(server.proc.pid).children(recursive=True)
    try:  # resumed whatever fails, so that the next tests get a live engine
        for p in engine:  # EngineCore, its worker, multiprocessing's resource tracker
            p.suspend()
        frozen_at = time.monotonic()
        at_freeze = scrape(server.base_url)
        assert at_freeze.generated < baseline + ROW.concurrency * ROW.output_tokens, f"row ended before the freeze; {seen}"
        thread.join(timeout=STALL_S + 60)
        named_after = time.monotonic() - frozen_at
        assert not thread.is_alive(), "the row hung"
        res = box["res"]
        assert res.result == "stalled", res
        # Named after the stall timeout, and promptly: a few scrapes and the client's stop
        # (grace 5 s), with room for a loaded 2-core CI machine.
        assert STALL_S <= named_after <= STALL_S + 20, named_after
        running = res.metrics["last"]["vllm:num_requests_running"]
        assert running >= 1 and at_freeze.running >= 1
        assert 1 <= res.metrics["generated_in_row"] < ROW.concurrency * ROW.output_tokens
        assert "no new token" in res.reason and f"{running:g} request(s) running" in res.reason
        assert res.result_json is None  # the client was stopped before it could write one
        assert not _processes_using(tmp_path / "rows"), "vllm bench serve still running"
    finally:
        for p in engine:
            p.resume()


def test_by_base_url_after_the_stall_a_row_passes(server, tmp_path):
    # The same server, resumed, targeted by URL as `--base-url` does: the stalled requests were
    # aborted when the client was stopped, and the next row runs normally.
    by_url = Server(base_url=server.base_url)
    watch = WatchConfig(stall_timeout_s=60, poll_s=POLL_S, row_timeout_s=240)
    row = MatrixRow("256", 256, 2, 16)
    res = run_row(row, by_url, server.model_id(), tmp_path, watch, tokenizer=server.model)
    assert res.result == "pass", res
    assert res.completed == 2 and res.ttft_mean_s > 0 and res.decode_tok_s_stream > 0


def test_engine_killed_mid_row_is_failed_and_nothing_left(server, tmp_path):
    watch = WatchConfig(stall_timeout_s=60, poll_s=POLL_S, row_timeout_s=240)
    baseline = scrape(server.base_url).generated
    thread, box = _run_in_thread(server, tmp_path, watch)
    _after_first_tokens(server, baseline)
    tree = [psutil.Process(server.proc.pid), *psutil.Process(server.proc.pid).children(recursive=True)]
    engine_core = next(p for p in tree if "EngineCore" in " ".join(p.cmdline()))
    engine_core.kill()
    thread.join(timeout=120)
    assert not thread.is_alive(), "the row hung"
    res = box["res"]
    assert res.result == "failed", res
    assert "vllm serve exited" in res.reason, res.reason
    assert res.log_tail and any("Engine" in line for line in res.log_tail), res.log_tail
    assert not _processes_using(tmp_path / "rows"), "vllm bench serve still running"
    server.stop()
    gone, alive = psutil.wait_procs(tree, timeout=10)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive

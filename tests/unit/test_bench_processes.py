"""Owned processes are stopped by their own PID and group with nothing left (real process
trees, including a frozen child and one that ignores SIGTERM); logs are read for OOM; the
client command is the seed's."""

from __future__ import annotations

import itertools
import json
import os
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

from http_stub import serving
from vllm_ampere.bench.matrix import MatrixRow
from vllm_ampere.bench.processes import Server, find_oom, start_owned, stop_owned, tail
from vllm_ampere.bench.runner import client_command, shortfall

# A parent with two children: one frozen (SIGSTOP), one that ignores SIGTERM; the parent
# ignores SIGTERM too when asked, so only SIGKILL ends it.
TREE = r"""
import signal, subprocess, sys, time
ignore = sys.argv[1] == "ignore"
if ignore:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
kids = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]),
        subprocess.Popen([sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])]
kids[0].send_signal(signal.SIGSTOP)
print("ready", flush=True)
time.sleep(600)
"""


def _start_tree(tmp_path: Path, mode: str):
    log = tmp_path / f"{mode}.log"
    proc = start_owned([sys.executable, "-c", TREE, mode], log)
    t0 = time.monotonic()
    while "ready" not in log.read_text():
        assert time.monotonic() - t0 < 30 and proc.poll() is None
        time.sleep(0.05)
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    assert len(tree) == 3
    assert any(p.status() == psutil.STATUS_STOPPED for p in tree)
    return proc, tree


def _all_gone(tree):
    for p in tree:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            pass
    return True


def test_stop_owned_ends_a_tree_with_a_frozen_child(tmp_path):
    proc, tree = _start_tree(tmp_path, "plain")
    assert os.getpgid(proc.pid) == proc.pid  # its own process group, led by its PID
    pids = stop_owned(proc, grace_s=5)
    assert sorted(pids) == sorted(p.pid for p in tree)
    assert _all_gone(tree) and proc.returncode == -signal.SIGTERM


def test_stop_owned_kills_what_ignores_sigterm_after_the_grace(tmp_path):
    proc, tree = _start_tree(tmp_path, "ignore")
    t0 = time.monotonic()
    stop_owned(proc, grace_s=1)
    assert 1 <= time.monotonic() - t0 < 15
    assert _all_gone(tree) and proc.returncode == -signal.SIGKILL


def test_stop_owned_after_the_process_exited(tmp_path):
    proc = start_owned([sys.executable, "-c", "pass"], tmp_path / "x.log")
    proc.wait()
    assert stop_owned(proc) == []


# A "vllm serve" that starts a long-lived child (as the engine core and workers are) and dies.
DIES_LEAVING_A_CHILD = ("import subprocess, sys, time; "
                        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
                        "print('child', p.pid, flush=True); time.sleep(0.5); sys.exit(3)")


def _children_in(log: Path) -> list[psutil.Process]:
    return [psutil.Process(int(line.split()[1])) for line in log.read_text().splitlines() if line.startswith("child ")]


def test_a_server_that_dies_leaves_nothing_running(tmp_path, monkeypatch):
    from vllm_ampere.bench import processes

    monkeypatch.setattr(processes, "vllm_command", lambda *args: [sys.executable, "-c", DIES_LEAVING_A_CHILD])
    log = tmp_path / "serve.log"
    server = Server(model="m", log_path=log, startup_timeout_s=30)
    # Died during a row: what it started is stopped before the restart.
    server.proc = start_owned([sys.executable, "-c", DIES_LEAVING_A_CHILD], log)
    server.proc.wait()
    (first,) = _children_in(log)
    assert first.is_running()
    # Died while starting: the same.
    with pytest.raises(processes.ServerError, match="exited while starting"):
        server.start(progress=lambda _: None)
    kids = _children_in(log)
    assert len(kids) == 2 and server.proc is None
    gone, alive = psutil.wait_procs(kids, timeout=10)
    assert not alive


def test_oom_and_tail_read_from_an_offset(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("old line\n(Worker_PP9 pid=7) torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 114.00 MiB\n")
    offset = log.stat().st_size
    with open(log, "a") as f:
        f.write("row 2 starts\nINFO all good\n")
    assert "Tried to allocate 114.00 MiB" in find_oom(log)
    assert find_oom(log, offset) is None  # an earlier row's OOM is not this row's
    assert tail(log, 2, offset) == ["row 2 starts", "INFO all good"]
    assert tail(tmp_path / "missing.log") == [] and find_oom(tmp_path / "missing.log") is None
    with open(log, "a") as f:
        f.write("RuntimeError: [enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: not enough memory\n")
    assert "DefaultCPUAllocator" in find_oom(log, offset)
    # Our own probes' access lines (a scrape every 2 s) do not push the cause out of a tail.
    with open(log, "a") as f:
        f.write("(EngineCore pid=9) ERROR EngineCore encountered a fatal error\n")
        for _ in range(50):
            f.write('(APIServer pid=8) INFO:     127.0.0.1:55434 - "GET /metrics HTTP/1.1" 200 OK\n')
        f.write('(APIServer pid=8) INFO:     127.0.0.1:55435 - "POST /v1/completions HTTP/1.1" 500 Internal Server Error\n')
    assert tail(log, 2, offset) == [
        "(EngineCore pid=9) ERROR EngineCore encountered a fatal error",
        '(APIServer pid=8) INFO:     127.0.0.1:55435 - "POST /v1/completions HTTP/1.1" 500 Internal Server Error']


def test_client_command_is_the_seed_shape(tmp_path):
    cmd = client_command(MatrixRow("16k", 15488, 2, 512), "http://127.0.0.1:8080", "MODEL_ID", tmp_path, "16k-c2.json")
    assert cmd[:4] == [sys.executable, "-m", "vllm.entrypoints.cli.main", "bench"]
    args = " ".join(cmd[4:])
    # The seed card's "Command shape", in its order, with INPUT_TOKENS and C filled in.
    seed = (
        "serve --backend openai --base-url http://127.0.0.1:8080 --endpoint /v1/completions "
        "--model MODEL_ID --dataset-name random --random-input-len 15488 --random-output-len 512 "
        "--random-prefix-len 0 --num-prompts 2 --max-concurrency 2 --request-rate inf "
        "--ignore-eos --temperature 0 --percentile-metrics ttft,tpot,itl,e2el"
    )
    assert args.startswith(seed)
    assert f"--result-dir {tmp_path} --result-filename 16k-c2.json" in args
    def seed_of(row):
        cmd = client_command(row, "u", "m", tmp_path, "f")
        return cmd[cmd.index("--seed") + 1]

    seeds = {seed_of(MatrixRow(c, 1, n, 1)) for c in ("1k", "16k") for n in (1, 2)}
    assert len(seeds) == 4  # one dataset seed per row: no prefix shared across rows


def test_server_arguments():
    s = Server(model="/m", serve_args=["--max-model-len", "4096"], log_path=Path("/tmp/x.log"), port=18123)
    assert s.owned and s.base_url == "http://127.0.0.1:18123" and not s.alive()
    assert Server(base_url="http://h:1/").base_url == "http://h:1"
    with pytest.raises(ValueError, match="either base_url"):
        Server()


def test_shortfall_names_failed_requests_and_short_streams():
    row = MatrixRow("32k", 32256, 2, 512)
    ok = {"completed": 2, "failed": 0, "output_lens": [512, 512], "errors": ["", ""]}
    assert shortfall(row, ok) is None
    # vLLM's client: a failed request has output length 0 and its traceback in errors.
    failed = {"completed": 1, "failed": 1, "output_lens": [0, 512],
              "errors": ["Traceback (most recent call last):\naiohttp.ClientPayloadError: Response payload is not completed", ""]}
    assert shortfall(row, failed) == "1 of 2 request(s) failed: aiohttp.ClientPayloadError: Response payload is not completed"
    cut = {"completed": 2, "failed": 0, "output_lens": [512, 100], "errors": ["", ""]}
    assert shortfall(row, cut) == "1 of 2 stream(s) ended early: [100] of 512 tokens"
    both = {"completed": 1, "failed": 1, "output_lens": [0, 7], "errors": ["x\nboom", ""]}
    assert shortfall(row, both) == "1 of 2 request(s) failed: boom; 1 of 2 stream(s) ended early: [7] of 512 tokens"


def test_a_start_failure_is_not_blamed_on_an_earlier_oom(tmp_path, monkeypatch):
    from vllm_ampere.bench import processes
    from vllm_ampere.bench.runner import WatchConfig, run_matrix

    log = tmp_path / "serve.log"
    log.write_text("torch.OutOfMemoryError: CUDA out of memory (an earlier row)\n")
    monkeypatch.setattr(processes, "vllm_command",
                        lambda *args: [sys.executable, "-c", "raise SystemExit('bad argument')"])
    server = Server(model="m", log_path=log, startup_timeout_s=30)
    (res,) = run_matrix([MatrixRow("1k", 1000, 1, 16)], server, tmp_path, WatchConfig())
    assert res.result == "failed" and res.reason == "vllm serve did not start"
    assert any("bad argument" in line for line in res.log_tail)


def test_a_running_servers_model_root_is_the_clients_tokenizer(tmp_path):
    roots = iter([str(tmp_path), "/no/such/model"])
    # vLLM's /v1/models: the served name as id, the loaded path as root.
    models = lambda path: json.dumps({"data": [{"id": "deepseek-v4-flash", "root": next(roots)}]}).encode()  # noqa: E731
    with serving(models) as url:
        server = Server(base_url=url)
        assert server.model_root() == str(tmp_path)
        assert server.model_root() is None  # a path this machine does not have: the client's default
    assert server.model_root() is None  # not answering


def _growing_metrics():
    """/metrics whose prefix-cache counters grow by 1000 queried and 250 hit tokens per scrape."""
    scrapes = itertools.count(1)

    def answer(path):
        n = next(scrapes)
        return (f"vllm:generation_tokens_total {16 * n}\nvllm:num_requests_running 0\n"
                f"vllm:prefix_cache_queries_total {1000 * n}\nvllm:prefix_cache_hits_total {250 * n}\n").encode()

    return answer


@pytest.mark.parametrize("result, log, outcome, reason", [
    ({"failed": 0, "output_lens": [16, 16], "errors": ["", ""]}, "", "pass", None),
    ({"failed": 1, "output_lens": [0, 16], "errors": ["Traceback\nClientPayloadError: payload", ""]}, "",
     "failed", "1 of 2 request(s) failed: ClientPayloadError: payload"),
    ({"failed": 1, "output_lens": [0, 16], "errors": ["x\nServerDisconnectedError", ""]},
     "(Worker_PP9 pid=7) torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 114.00 MiB\n", "oom",
     "1 of 2 request(s) failed: ServerDisconnectedError; server log: (Worker_PP9 pid=7) torch.OutOfMemoryError"),
])
def test_run_row_decides_from_the_result_and_the_log(tmp_path, monkeypatch, result, log, outcome, reason):
    """run_row on a row whose client, a stand-in, writes vLLM's result JSON and ends at once,
    while the server logs `log`."""
    from vllm_ampere.bench import runner

    data = {"completed": 2 - result["failed"], "total_input_tokens": 512, "mean_ttft_ms": 100.0,
            "mean_tpot_ms": 20.0, "output_throughput": 90.0} | result
    server_log = tmp_path / "server.log"
    server_log.write_text("(an earlier row) torch.OutOfMemoryError: CUDA out of memory\n")
    client = (f"import pathlib, sys; pathlib.Path(sys.argv[1]).write_text({json.dumps(json.dumps(data))}); "
              f"open({str(server_log)!r}, 'a').write({log!r})")
    monkeypatch.setattr(runner, "client_command",
                        lambda row, url, model, rows_dir, name, *rest: [sys.executable, "-c", client, str(rows_dir / name)])
    with serving(_growing_metrics()) as url:
        server = Server(base_url=url, log_path=server_log)
        res = runner.run_row(MatrixRow("256", 256, 2, 16), server, "m", tmp_path, runner.WatchConfig(poll_s=0.1))
    assert res.result == outcome, res
    assert res.reason == reason or res.reason.startswith(reason), res.reason
    assert res.completed == data["completed"] and res.ttft_mean_s == 0.1
    assert res.prefix_cache_hit_rate == 0.25  # read from /metrics before and after the row

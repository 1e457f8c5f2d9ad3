"""Starting, waiting for and stopping the processes we own: `vllm serve` and `vllm bench serve`
(the benchmark), the LMCache server (cluster/lmcache.py).

Each is started in a session of its own (so its process-group id is its PID) and stopped by
that PID: SIGTERM first (vLLM's API server then shuts its engine and workers down itself),
SIGKILL to the whole group and to every descendant seen before the stop after a grace period.
Descendants are collected before signalling because vLLM's engine-core and worker processes
are re-parented once the API server is gone; a frozen (SIGSTOPped) process takes SIGKILL too.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

import psutil

# Out-of-memory messages of torch (CUDA and CPU allocators) and of the kernel's OOM killer.
OOM_PATTERN = re.compile(
    r"OutOfMemoryError|CUDA out of memory|CUDA error: out of memory|"
    r"Tried to allocate .* (?:free|available)|Cannot allocate memory|"
    r"DefaultCPUAllocator: not enough memory|Killed process \d+",
    re.IGNORECASE,
)


def vllm_command(*args: str) -> list[str]:
    """`vllm ARGS...` run by this interpreter (the `vllm` console script's own entry point)."""
    return [sys.executable, "-m", "vllm.entrypoints.cli.main", *args]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _log_lines(path: Path, start: int) -> list[str]:
    """The lines of a log from byte `start` on; none when the log does not exist (yet)."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            return f.read().decode("utf-8", "replace").splitlines()
    except FileNotFoundError:
        return []


# The server's access-log lines of our own probes (the watchdog scrapes /metrics every few
# seconds): in a tail they would push out the lines that say why a row failed.
PROBE_LINE = re.compile(r'"GET /(?:metrics|health|v1/models) HTTP/1\.[01]" \d{3}')


def tail(path: Path, lines: int = 40, start: int = 0) -> list[str]:
    """The last `lines` lines of a log from byte `start` on, without our probes' access lines."""
    return [line for line in _log_lines(path, start) if not PROBE_LINE.search(line)][-lines:]


def find_oom(path: Path, start: int = 0) -> str | None:
    """The first out-of-memory line of a log from byte `start` on, or None."""
    return next((line.strip() for line in _log_lines(path, start) if OOM_PATTERN.search(line)), None)


def start_owned(cmd: list[str], log_path: Path, env: dict | None = None) -> subprocess.Popen:
    """Start `cmd` in its own session, stdout and stderr appended to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )


def stop_owned(proc: subprocess.Popen, grace_s: float = 30.0) -> list[int]:
    """Stop `proc` and everything it started; return the PIDs that were still alive to stop.

    After this returns no process of the tree is running (zombies of other parents excepted:
    they hold no resources and their parent reaps them).
    """
    try:
        tree = [psutil.Process(proc.pid)]
        tree += tree[0].children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    pids = [p.pid for p in tree]
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        # A frozen process never acts on SIGTERM; SIGCONT lets the API server shut down cleanly.
        _signal_group(proc.pid, signal.SIGCONT)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    _signal_group(proc.pid, signal.SIGKILL)
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(tree, timeout=10)
    return pids


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def http_get(url: str, timeout_s: float = 5.0) -> tuple[int | None, str]:
    """(HTTP status, body) of GET `url`; (None, why) when there is no answer at all."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")
    except (OSError, ValueError) as e:  # URLError is an OSError; ValueError: a malformed URL
        return None, str(e)


def http_ok(url: str, timeout_s: float = 5.0) -> bool:
    return http_get(url, timeout_s)[0] == 200


def wait_ready(proc: subprocess.Popen, ready: Callable[[], bool], timeout_s: float,
               period_s: float = 1.0) -> bool:
    """Poll `ready()` until it holds (True), or `proc` exits or `timeout_s` passes (False;
    `proc.poll()` tells which)."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(period_s)
    return True


class ServerError(RuntimeError):
    """The server did not come up; the message carries the last lines of its log."""


class Server:
    """`vllm serve MODEL ARGS` started by us, or a running server given by its base URL."""

    def __init__(
        self,
        *,
        base_url: str | None = None,
        model: str | None = None,
        serve_args: list[str] = (),
        log_path: Path | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        env: dict | None = None,
        startup_timeout_s: float = 900.0,
    ):
        if (base_url is None) == (model is None):
            raise ValueError("give either base_url (a running server) or model (start one)")
        self.model = model
        self.serve_args = list(serve_args)
        self.log_path = log_path
        self.env = env
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        if base_url is not None:
            self.base_url = base_url.rstrip("/")
        else:
            self._host, self._port = host, port or free_port(host)
            self.base_url = f"http://{host}:{self._port}"

    @property
    def owned(self) -> bool:
        return self.model is not None

    def alive(self) -> bool:
        """Our process still runs (owned) or the server answers /health (given by URL)."""
        if self.owned:
            return self.proc is not None and self.proc.poll() is None
        return http_ok(f"{self.base_url}/health")

    def log_offset(self) -> int:
        """Current size of our log: rows read the log from here on."""
        try:
            return self.log_path.stat().st_size if self.log_path else 0
        except FileNotFoundError:
            return 0

    def start(self, progress=print) -> None:
        """Start `vllm serve` and wait until /health answers 200; raise ServerError if it dies."""
        assert self.owned and self.log_path is not None
        self.stop()  # a server that died by itself may leave its engine and workers running
        cmd = vllm_command(
            "serve", self.model, "--host", self._host, "--port", str(self._port), *self.serve_args
        )
        offset = self.log_offset()
        with open(self.log_path, "a") as log:
            log.write(f"\n### vllm-ampere bench: {' '.join(cmd)}\n")
        self.proc = start_owned(cmd, self.log_path, self.env)
        self.starts += 1
        progress(f"started vllm serve (pid {self.proc.pid}), log {self.log_path}")
        t0 = time.monotonic()
        health = f"{self.base_url}/health"
        if not wait_ready(self.proc, lambda: http_ok(health, timeout_s=2), self.startup_timeout_s):
            if self.proc.poll() is not None:
                lines = "\n".join(tail(self.log_path, 30, offset))
                self.stop()  # what it started may outlive it
                raise ServerError(f"vllm serve exited while starting; {self.log_path}:\n{lines}")
            self.stop()
            raise ServerError(
                f"vllm serve not healthy after {self.startup_timeout_s:.0f} s; see {self.log_path}"
            )
        progress(f"vllm serve healthy at {self.base_url} after {time.monotonic() - t0:.0f} s")

    def stop(self) -> None:
        if self.proc is not None:
            stop_owned(self.proc)
            self.proc = None

    def _first_model(self) -> dict:
        with urllib.request.urlopen(f"{self.base_url}/v1/models", timeout=10) as r:
            data = json.load(r)["data"]
        if not data:
            raise ServerError(f"{self.base_url}/v1/models lists no model")
        return data[0]

    def model_id(self) -> str:
        """The first model the server lists (what `vllm bench serve --model` must name)."""
        return self._first_model()["id"]

    def model_root(self) -> str | None:
        """The path the server loaded its model from (/v1/models `root`), where that folder
        exists here: the client's tokenizer when the served name is not a path."""
        try:
            root = self._first_model().get("root")
        except (OSError, ValueError, KeyError, ServerError):
            return None
        return root if root and Path(root).is_dir() else None

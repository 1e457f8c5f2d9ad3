"""The LMCache KV sidecar: which topologies work for DeepSeek-V4, its command, its health.

Facts of LMCache 0.5.6 this relies on (lmcache/integration/vllm/lmcache_mp_connector.py,
lmcache/v1/multiprocess/{config,http_server}.py, transfer_context/worker_transfer.py):
- only LMCacheMPConnector handles DeepSeek-V4's several KV cache groups;
- with several servers (lmcache.mp.server_urls) it raises for pipeline_parallel_size > 1:
  per-piece reader counts would differ per (server, stage);
- lmcache_driven transfer (the default for CUDA workers) has the server pull KV through
  CUDA IPC / shared memory: same node only;
- engine_driven transfer (workers copy KV over TCP, which would cross nodes) registers exactly
  one KV transfer group (EngineDrivenTransferContext.register raises "engine-driven transfer
  does not support multiple KV transfer groups now"), and every DeepSeek-V4 stage registers
  several (sliding window, compressed, indexer, compressor states): each worker would fail at
  KV cache registration;
- the server starts on a CPU-only machine; GET /healthcheck answers {"status": "healthy"}
  once its cache engine is up.

So LMCache serves DeepSeek-V4 only when every pipeline stage shares the server's node (one
server, lmcache_driven); a cluster across nodes runs without it (`lmcache: {enabled: false}`).
Single-node lmcache_driven with DeepSeek-V4 has not been run on GPUs in this project yet.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from vllm_ampere.bench.processes import http_get, start_owned, stop_owned, wait_ready
from vllm_ampere.cluster.description import Cluster, Node

CONNECTOR = "LMCacheMPConnector"


def validate_topology(cluster: Cluster) -> list[str]:
    """Why LMCache would refuse this cluster (empty: it accepts it)."""
    lm = cluster.lmcache
    if not lm.enabled:
        return []
    errors = []
    pp = cluster.pipeline_parallel_size
    if lm.servers > 1 and pp > 1:
        errors.append(
            f"lmcache.servers={lm.servers} with pipeline parallelism (PP={pp}): LMCache 0.5.6's "
            "LMCacheMPConnector supports several servers only with TP, not PP. Use one server."
        )
    if lm.servers > 1 and pp % lm.servers:
        errors.append(f"the {pp} workers must divide evenly over lmcache.servers={lm.servers}")
    if lm.transfer_mode == "engine_driven":
        errors.append(
            "lmcache.transfer_mode=engine_driven: LMCache 0.5.6's engine-driven transfer registers "
            "one KV transfer group, and every DeepSeek-V4 stage has several (sliding window, "
            "compressed, indexer, compressor states), so each worker would fail at KV cache "
            "registration. Use lmcache_driven with every GPU on the server's node, or "
            "lmcache: {enabled: false}."
        )
    host = server_node(cluster)
    remote = [n.name for n in cluster.nodes if n.name != host.name]
    if lm.transfer_mode == "lmcache_driven" and remote:
        errors.append(
            f"lmcache.transfer_mode=lmcache_driven with workers on {remote}: the server on "
            f"{host.name} pulls KV through CUDA IPC / shared memory, which do not cross nodes, "
            "and LMCache 0.5.6 has no mode that serves DeepSeek-V4 across nodes. Set "
            "lmcache: {enabled: false} for this cluster."
        )
    return errors


def server_node(cluster: Cluster) -> Node:
    return cluster.node(cluster.lmcache.node) if cluster.lmcache.node else cluster.head


def runs_on(cluster: Cluster, node: Node) -> bool:
    """Whether `node` runs the LMCache server."""
    return cluster.lmcache.enabled and server_node(cluster) == node


def kv_transfer_config(cluster: Cluster) -> dict:
    """vLLM's --kv-transfer-config for the one server."""
    lm = cluster.lmcache
    return {
        "kv_connector": CONNECTOR,
        "kv_role": "kv_both",
        "kv_connector_extra_config": {
            "lmcache.mp.host": f"tcp://{server_node(cluster).address}",
            "lmcache.mp.port": lm.port,
            "lmcache.mp.mp_transfer_mode": lm.transfer_mode,
        },
    }


def server_argv(cluster: Cluster, python: str, bind: str | None = None) -> list[str]:
    """The server's command line; `bind` defaults to the server node's address."""
    lm = cluster.lmcache
    host = bind or server_node(cluster).address
    return [
        python, "-m", "lmcache.v1.multiprocess.http_server",
        "--host", host, "--port", str(lm.port),
        "--http-host", host, "--http-port", str(lm.http_port),
        "--l1-size-gb", f"{lm.l1_size_gb:g}", "--eviction-policy", lm.eviction_policy,
        "--supported-transfer-mode", lm.transfer_mode,
        "--chunk-size", "256",  # = DeepSeek-V4's KV block (vLLM block_size 256)
    ]


def lmcache_python() -> str:
    """The interpreter that has lmcache: this one (the image), else the repo's .venv-lmcache."""
    if importlib.util.find_spec("lmcache") is not None:
        return sys.executable
    venv = Path(__file__).resolve().parents[3] / ".venv-lmcache" / "bin" / "python"
    if venv.exists():
        return str(venv)
    raise RuntimeError(
        "lmcache is not installed here and .venv-lmcache is missing: run tools/setup-lmcache-env.sh"
    )


def health_url(host: str, http_port: int) -> str:
    return f"http://{host}:{http_port}/healthcheck"


def healthcheck(host: str, http_port: int, timeout: float = 2.0) -> tuple[bool, str]:
    """(healthy, what the server said) for GET /healthcheck."""
    status, body = http_get(health_url(host, http_port), timeout)
    if status != 200:
        return False, f"HTTP {status}: {body}" if status else body
    try:
        return json.loads(body).get("status") == "healthy", body
    except ValueError as e:
        return False, str(e)


def start_server(cluster: Cluster, log_path: Path, python: str | None = None,
                 bind: str | None = None, wait_s: float = 120.0) -> subprocess.Popen:
    """Start the server, wait until /healthcheck says healthy; raise with its log tail if not.
    Stop it with bench.processes.stop_owned (SIGTERM: it shuts its engine down cleanly)."""
    argv = server_argv(cluster, python or lmcache_python(), bind)
    host = bind or server_node(cluster).address
    proc = start_owned(argv, log_path)
    said = ""

    def healthy() -> bool:
        nonlocal said
        ok, said = healthcheck(host, cluster.lmcache.http_port)
        return ok

    if wait_ready(proc, healthy, wait_s, period_s=0.5):
        return proc
    stop_owned(proc)
    tail = log_path.read_text(errors="replace")[-3000:]
    raise RuntimeError(
        f"LMCache server not healthy at {health_url(host, cluster.lmcache.http_port)} "
        f"(exit code {proc.returncode}, last answer: {said}); log {log_path}:\n{tail}"
    )

"""The LMCache MP server started for real on loopback by the launch's own code, found healthy
by the launch's own health check, then stopped. CPU only: the server needs no GPU."""

from __future__ import annotations

from vllm_ampere.bench.processes import free_port, stop_owned
from vllm_ampere.cluster import lmcache
from vllm_ampere.cluster.command import live_checks
from vllm_ampere.cluster.description import Cluster


def test_sidecar_starts_healthy_and_stops(tmp_path):
    port, http_port = free_port(), free_port()
    cluster = Cluster.model_validate({
        "model": "/models/deepseek-v4-int4-int8",
        "context_length": 16384,
        "interface": "lo",
        "log_dir": str(tmp_path),
        "nodes": [{"name": "local", "address": "127.0.0.1", "gpus": 1}],
        "lmcache": {"l1_size_gb": 1, "port": port, "http_port": http_port},
    })
    log = tmp_path / "lmcache.log"
    # .venv-lmcache (tools/setup-lmcache-env.sh, run by tools/setup-env.sh) or the image's env.
    proc = lmcache.start_server(cluster, log, python=lmcache.lmcache_python(), wait_s=180)
    try:
        ok, said = lmcache.healthcheck("127.0.0.1", http_port)
        assert ok, said
        checks = {name: (healthy, detail) for name, healthy, detail in
                  live_checks(cluster, cluster.head)}
        assert checks["lmcache /healthcheck"][0], checks
        assert not checks["vllm /health"][0]  # no vLLM here: reported, not hidden
    finally:
        stop_owned(proc)
    assert proc.returncode is not None
    ok, said = lmcache.healthcheck("127.0.0.1", http_port, timeout=1)
    assert not ok
    text = log.read_text()
    assert "LMCache HTTP server stopped" in text or "Application shutdown complete" in text

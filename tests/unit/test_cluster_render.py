"""The rendered launch for a 10-GPU cluster description, read back by the pinned vLLM."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vllm_ampere.cluster import lmcache
from vllm_ampere.cluster.description import Cluster, load_cluster
from vllm_ampere.cluster.render import plan

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "docker/cluster.example.yaml"


def cluster(**overrides) -> Cluster:
    data = {
        "model": "/models/deepseek-v4-int4-int8",
        "context_length": 65536,
        "interface": "enp5s0",
        "nodes": [
            {"name": "a", "address": "10.0.0.1", "gpus": 4},
            {"name": "b", "address": "10.0.0.2", "gpus": 4},
            {"name": "c", "address": "10.0.0.3", "gpus": 2},
        ],
    }
    data.update(overrides)
    return Cluster.model_validate(data)


def test_example_description_is_the_ten_gpu_cluster():
    c = load_cluster(EXAMPLE)
    assert c.pipeline_parallel_size == 10 and c.head.name == "a"
    assert plan(c).problems == []


def test_serve_command_parsed_by_vllm():
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    p = plan(load_cluster(EXAMPLE))
    argv = p.serve_argv()
    assert argv[:3] == ["vllm", "serve", "/models/deepseek-v4-int4-int8"]
    ns = make_arg_parser(FlexibleArgumentParser()).parse_args(argv[3:] + ["--model", argv[2]])
    args = AsyncEngineArgs.from_cli_args(ns)
    assert args.pipeline_parallel_size == 10 and args.tensor_parallel_size == 1
    assert args.distributed_executor_backend == "ray"
    assert args.max_model_len == 65536 and args.max_num_seqs == 6
    assert args.max_num_batched_tokens == 2048 and args.kv_cache_dtype == "fp8"
    assert args.kv_cache_memory_bytes == p.stages[0].kv_pool
    assert args.served_model_name == ["deepseek-v4-flash"]
    assert args.kv_transfer_config is None  # across nodes: no LMCache (lmcache.validate_topology)
    # One node: LMCache pulls KV through CUDA IPC.
    single = plan(load_cluster(REPO / "docker/cluster.single-node.yaml"))
    assert single.problems == []
    argv = single.serve_argv()
    ns = make_arg_parser(FlexibleArgumentParser()).parse_args(argv[3:] + ["--model", argv[2]])
    kv = AsyncEngineArgs.from_cli_args(ns).kv_transfer_config
    assert kv.kv_connector == "LMCacheMPConnector" and kv.kv_role == "kv_both"
    assert kv.kv_connector_extra_config == {
        "lmcache.mp.host": "tcp://127.0.0.1",
        "lmcache.mp.port": 6555,
        "lmcache.mp.mp_transfer_mode": "lmcache_driven",
    }


def test_environment_per_node():
    p = plan(cluster())
    a, b, c = p.cluster.nodes
    head = p.node_env(a)
    assert head == {
        "VLLM_HOST_IP": "10.0.0.1",
        "NCCL_SOCKET_IFNAME": "enp5s0",
        "GLOO_SOCKET_IFNAME": "enp5s0",
        "NCCL_IB_DISABLE": "1",
        "NCCL_P2P_DISABLE": "1",
        "VLLM_PP_LAYER_PARTITION": ",".join(map(str, p.partition)),
    }
    # Workers: their own address; the partition travels from the head through Ray.
    assert p.node_env(c)["VLLM_HOST_IP"] == "10.0.0.3"
    assert "VLLM_PP_LAYER_PARTITION" not in p.node_env(b)
    nvl = plan(cluster(nvlink=True)).node_env(b)
    assert nvl["NCCL_P2P_LEVEL"] == "NVL" and "NCCL_P2P_DISABLE" not in nvl


def test_ray_and_node_scripts():
    p = plan(cluster())
    a, b, _ = p.cluster.nodes
    assert p.ray_start_argv(a) == ["ray", "start", "--node-ip-address=10.0.0.1", "--num-gpus=4",
                                   "--head", "--port=6379", "--disable-usage-stats"]
    assert p.ray_start_argv(b)[-2:] == ["--address=10.0.0.1:6379", "--block"]
    head_script, worker_script = p.node_script(a), p.node_script(b)
    assert "lmcache.v1.multiprocess.http_server" in head_script
    assert "vllm serve" in head_script and "/var/log/vllm-ampere/vllm-serve.log" in head_script
    assert "vllm serve" not in worker_script and "http_server" not in worker_script
    # LMCache on a worker: started and healthy before `ray start --block`, which never returns.
    moved = plan(cluster(lmcache={"node": "c"}))
    lines = moved.node_script(moved.cluster.nodes[2]).splitlines()
    order = [next(i for i, line in enumerate(lines) if key in line)
             for key in ("http_server", "http://10.0.0.3:6556/healthcheck", "ray start")]
    assert order == sorted(order) and "--block" in lines[order[2]]
    argv = p.lmcache_argv("python3")
    for flag, value in [("--host", "10.0.0.1"), ("--port", "6555"), ("--http-port", "6556"),
                        ("--eviction-policy", "LRU"),
                        ("--supported-transfer-mode", "lmcache_driven")]:
        assert argv[argv.index(flag) + 1] == value


def test_lmcache_refuses_what_lmcache_refuses():
    many = plan(cluster(lmcache={"servers": 2}))
    assert any("supports several servers only with TP, not PP" in p for p in many.problems)
    ipc = plan(cluster(lmcache={"transfer_mode": "lmcache_driven"}))
    assert any("do not cross nodes" in p and "['b', 'c']" in p and "enabled: false" in p for p in ipc.problems)
    # engine_driven would cross nodes, but registers one KV transfer group; DeepSeek-V4 has several.
    tcp = plan(cluster(lmcache={"transfer_mode": "engine_driven"}))
    assert any("engine_driven" in p and "one KV transfer group" in p for p in tcp.problems)
    assert lmcache.validate_topology(cluster(lmcache={"enabled": False})) == []
    # One node: CUDA IPC reaches every worker, so lmcache_driven is accepted.
    single = load_cluster(REPO / "docker/cluster.single-node.yaml")
    assert lmcache.validate_topology(single) == []
    assert lmcache.validate_topology(cluster(lmcache={"enabled": False, "servers": 3})) == []
    # Elsewhere than the head: the URL follows the server's node.
    moved = cluster(lmcache={"node": "c"})
    assert lmcache.kv_transfer_config(moved)["kv_connector_extra_config"][
        "lmcache.mp.host"] == "tcp://10.0.0.3"


@pytest.mark.parametrize("change, message", [
    ({"nodes": [{"name": "a", "address": "10.0.0.1", "gpus": 2},
                {"name": "a", "address": "10.0.0.2", "gpus": 2}]}, "names must be unique"),
    ({"nodes": [{"name": "a", "address": "head.local", "gpus": 2}]}, "address"),
    ({"lmcache": {"node": "z"}}, "lmcache.node 'z'"),
    ({"context_length": 10}, "context_length"),
    ({"gpus_per_node": 4}, "gpus_per_node"),
])
def test_bad_descriptions(tmp_path, change, message):
    path = tmp_path / "cluster.json"
    data = {"model": "/m", "context_length": 65536, "interface": "eth0",
            "nodes": [{"name": "a", "address": "10.0.0.1", "gpus": 2}], **change}
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message) as e:
        load_cluster(path)
    assert str(path) in str(e.value)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vllm_ampere.cli", "cluster", *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_render_check_and_refusal(tmp_path):
    r = _cli("render", str(EXAMPLE))
    assert r.returncode == 0, r.stderr
    assert "VLLM_PP_LAYER_PARTITION=" in r.stdout and r.stdout.count("ray start") == 3
    eight = tmp_path / "eight.yaml"
    eight.write_text(EXAMPLE.read_text().replace("gpus: 2", "gpus: 0").replace(
        "  - {name: c, address: 10.0.0.3, gpus: 0}\n", ""))
    r = _cli("check", str(eight))
    assert r.returncode == 1 and "refused" in r.stderr and "does not fit" in r.stderr
    r = _cli("launch", str(EXAMPLE), "--node", "b", "--role", "head")
    assert r.returncode == 2 and "is a worker" in r.stderr


def test_launched_process_output_goes_to_stdout_and_log(tmp_path):
    """launch replaces itself by `ray start` / `vllm serve`; their output must reach both
    `docker logs` and the node's log file."""
    log = tmp_path / "vllm-serve.log"
    code = ("import os, sys; from pathlib import Path; "
            "from vllm_ampere.cluster.command import _exec_logged; "
            "_exec_logged([sys.executable, '-c', 'print(\"serving\")'], dict(os.environ), "
            f"Path({str(log)!r}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "serving" in r.stdout
    for _ in range(50):  # tee may flush just after the child exits
        if log.exists() and "serving" in log.read_text():
            break
        time.sleep(0.1)
    assert "serving" in log.read_text()

"""`vllm-ampere cluster render|launch|check CLUSTER.yaml`: PP across RTX 3090 nodes on Ray."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from vllm_ampere.bench.processes import http_get
from vllm_ampere.cluster import lmcache
from vllm_ampere.cluster.description import Cluster, Node, load_cluster
from vllm_ampere.cluster.partition import partition_env
from vllm_ampere.cluster.render import LaunchPlan, plan

HELP = "render, launch or check a pipeline-parallel deployment from a cluster description"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["render", "launch", "check"],
                        help="render: print each node's commands; launch: run this node's "
                        "part; check: the memory fit (with --live: this node's running services instead)")
    parser.add_argument("config", help="cluster description (YAML or JSON)")
    parser.add_argument("--node", help="this node's name (launch, check --live)")
    parser.add_argument("--role", choices=["head", "worker"],
                        help="launch: refuse unless --node has this role (the head is the "
                        "first node of the description)")
    parser.add_argument("--live", action="store_true",
                        help="check: probe the services this node runs (the image's health check)")
    parser.add_argument("--gpu-wait-s", type=float, default=1800,
                        help="launch on the head: how long to wait for all GPUs to join Ray")


def _summary(p: LaunchPlan) -> str:
    c = p.cluster
    lines = [
        f"pipeline: {c.pipeline_parallel_size} stages over {len(c.nodes)} nodes, "
        f"context {c.context_length}, max_num_seqs {c.max_num_seqs}, "
        f"concurrency {c.concurrency}, GPU {c.gpu_memory_bytes() / 1024**3:.1f} GiB",
        f"VLLM_PP_LAYER_PARTITION={partition_env(p.partition)}",
        "memory per stage (GiB):",
        p.memory_table(),
    ]
    if c.lmcache.enabled:
        host = lmcache.server_node(c)
        lines.append(f"LMCache: one server on {host.name} ({host.address}), "
                     f"{c.lmcache.transfer_mode} transfer")
    return "\n".join(lines)


def _refuse(p: LaunchPlan) -> int:
    print("refused:", file=sys.stderr)
    for problem in p.problems:
        print(f"  - {problem}", file=sys.stderr)
    return 1


def live_checks(cluster: Cluster, node: Node) -> list[tuple[str, bool, str]]:
    """(service, healthy, detail) of what `node` runs."""
    results = []
    if lmcache.runs_on(cluster, node):
        ok, said = lmcache.healthcheck(node.address, cluster.lmcache.http_port)
        results.append(("lmcache /healthcheck", ok, said))
    if node == cluster.head:
        status, said = http_get(f"http://{node.address}:{cluster.port}/health")
        results.append(("vllm /health", status == 200, f"HTTP {status}" if status else said))
    else:
        address = f"--address={cluster.head.address}:{cluster.ray_port}"
        r = subprocess.run(["ray", "status", address], capture_output=True, text=True)
        results.append(("ray status", r.returncode == 0, (r.stdout + r.stderr).strip()[-300:]))
    return results


def _wait_for_gpus(cluster: Cluster, wait_s: float) -> None:
    import ray  # only on the head of a real deployment

    want = cluster.pipeline_parallel_size
    ray.init(address="auto", log_to_driver=False)
    try:
        deadline = time.monotonic() + wait_s
        while (have := int(ray.cluster_resources().get("GPU", 0))) < want:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {have} of {want} GPUs joined Ray after {wait_s:.0f} s")
            print(f"cluster: {have}/{want} GPUs in Ray, waiting for workers", flush=True)
            time.sleep(5)
    finally:
        ray.shutdown()


def _exec_logged(argv: list[str], env: dict[str, str], log: Path) -> None:
    """Replace this process by `argv` (so it gets the container's signals) with its output
    both on stdout (docker logs) and appended to `log`."""
    script = 'exec > >(tee -a "$0") 2>&1; exec "$@"'
    os.execvpe("bash", ["bash", "-c", script, str(log), *argv], env)


def _launch(p: LaunchPlan, node: Node, gpu_wait_s: float) -> int:
    c = p.cluster
    # This node's environment for all it starts: the LMCache server, `ray start`, this
    # process's ray.init (waiting for the GPUs) and the process it becomes.
    os.environ.update(p.node_env(node))
    env = dict(os.environ)
    log_dir = Path(c.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    if lmcache.runs_on(c, node):
        server = lmcache.start_server(c, log_dir / "lmcache.log")
        print(f"cluster: LMCache server pid {server.pid} healthy", flush=True)
    if node != c.head:  # a worker: join Ray and stay in the foreground
        _exec_logged(p.ray_start_argv(node), env, log_dir / "ray-worker.log")
    subprocess.run(p.ray_start_argv(node), env=env, check=True)
    _wait_for_gpus(c, gpu_wait_s)
    argv = p.serve_argv()
    print("cluster: exec", " ".join(argv[:3]), "...", flush=True)
    _exec_logged(argv, env, log_dir / "vllm-serve.log")


def run(args: argparse.Namespace) -> int:
    try:
        cluster = load_cluster(args.config)
        node = cluster.node(args.node) if args.node else None
        # `check --live` is the image's HEALTHCHECK (every 30 s): it asks the services only,
        # without the memory plan, whose KV sizing imports vLLM (seconds).
        launch_plan = None if args.action == "check" and args.live else plan(cluster)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if launch_plan is None:
        if node is None:
            print("error: check --live needs --node", file=sys.stderr)
            return 2
        results = live_checks(cluster, node)
        for service, ok, said in results:
            print(f"{'ok ' if ok else 'BAD'} {service}: {said}")
        return 0 if all(ok for _, ok, _ in results) else 1
    print(_summary(launch_plan))
    if launch_plan.problems:
        return _refuse(launch_plan)
    if args.action == "render":
        for n in cluster.nodes:
            print()
            print(launch_plan.node_script(n))
        return 0
    if args.action == "launch":
        if node is None:
            print("error: launch needs --node", file=sys.stderr)
            return 2
        role = "head" if node == cluster.head else "worker"
        if args.role and args.role != role:
            print(f"error: node {node.name} is a {role} in {args.config} "
                  f"(the head is {cluster.head.name}), not a {args.role}", file=sys.stderr)
            return 2
        return _launch(launch_plan, node, args.gpu_wait_s)
    return 0

"""From a cluster description to what each node runs: `ray start`, the environment, the
LMCache server and the `vllm serve` line (head only).

Multi-node PP runs on vLLM's Ray executor (`--distributed-executor-backend ray`). vLLM copies
the driver's environment to every Ray worker except the worker-specific variables
(v1/executor/ray_utils.py WORKER_SPECIFIC_ENV_VARS: VLLM_HOST_IP, CUDA_VISIBLE_DEVICES, ...),
so VLLM_PP_LAYER_PARTITION and the NCCL settings go on the head, and each node sets its own
VLLM_HOST_IP before `ray start --node-ip-address` with the same address.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

from vllm_ampere.cluster import lmcache
from vllm_ampere.cluster.description import Cluster, Node
from vllm_ampere.cluster.memory import Deployment, StageMemory, plan_memory
from vllm_ampere.cluster.model import ModelDims
from vllm_ampere.cluster.partition import partition_env, partition_layers


def network_env(cluster: Cluster, node: Node) -> dict[str, str]:
    """Per-node environment for NCCL/Gloo between PCIe consumer GPUs without InfiniBand."""
    env = {
        "VLLM_HOST_IP": node.address,
        "NCCL_SOCKET_IFNAME": cluster.interface,
        "GLOO_SOCKET_IFNAME": cluster.interface,
        "NCCL_IB_DISABLE": "1",  # no InfiniBand: sockets over `interface`
    }
    if cluster.nvlink:
        env["NCCL_P2P_LEVEL"] = "NVL"  # P2P only between NVLink-bridged 3090 pairs
    else:
        # GeForce drivers do not offer PCIe P2P between 3090s; same-node neighbours go
        # through host shared memory instead of NCCL probing a P2P path.
        env["NCCL_P2P_DISABLE"] = "1"
    return env


@dataclass
class LaunchPlan:
    cluster: Cluster
    dims: ModelDims
    deployment: Deployment
    partition: list[int]
    stages: list[StageMemory]

    @property
    def problems(self) -> list[str]:
        found = [p for s in self.stages for p in s.problems]
        return found + lmcache.validate_topology(self.cluster)

    def head_env(self) -> dict[str, str]:
        env = network_env(self.cluster, self.cluster.head)
        env["VLLM_PP_LAYER_PARTITION"] = partition_env(self.partition)
        return env

    def node_env(self, node: Node) -> dict[str, str]:
        return self.head_env() if node == self.cluster.head else network_env(self.cluster, node)

    def ray_start_argv(self, node: Node) -> list[str]:
        c = self.cluster
        argv = ["ray", "start", f"--node-ip-address={node.address}", f"--num-gpus={node.gpus}"]
        if node == c.head:
            return argv + ["--head", f"--port={c.ray_port}", "--disable-usage-stats"]
        return argv + [f"--address={c.head.address}:{c.ray_port}", "--block"]

    def serve_argv(self) -> list[str]:
        c, stages = self.cluster, self.stages
        argv = [
            "vllm", "serve", c.model,
            "--host", "0.0.0.0", "--port", str(c.port),
            "--distributed-executor-backend", "ray",
            "--pipeline-parallel-size", str(c.pipeline_parallel_size),
            "--tensor-parallel-size", "1",
            "--max-model-len", str(c.context_length),
            "--max-num-seqs", str(c.max_num_seqs),
            "--max-num-batched-tokens", str(c.max_num_batched_tokens),
            "--kv-cache-dtype", "fp8",  # DeepSeek-V4 turns fp8 into its fp8_ds_mla layout
            # Per GPU, and it makes vLLM ignore gpu_memory_utilization (config/cache.py):
            # the pool admits `concurrency` requests of the context by vLLM's own sizing
            # (memory.py), the rest stays headroom.
            "--kv-cache-memory-bytes", str(stages[0].kv_pool),
        ]
        if c.served_model_name:
            argv += ["--served-model-name", c.served_model_name]
        if c.lmcache.enabled:
            argv += ["--kv-transfer-config", json.dumps(lmcache.kv_transfer_config(c))]
        return argv

    def lmcache_argv(self, python: str = "python3") -> list[str] | None:
        return lmcache.server_argv(self.cluster, python) if self.cluster.lmcache.enabled else None

    def node_script(self, node: Node) -> str:
        """The commands one node runs, as a shell script (what `render` prints)."""
        c = self.cluster
        log = Path(c.log_dir)
        lines = [f"# node {node.name} ({node.address}, {node.gpus} GPU)"]
        lines += [f"export {k}={shlex.quote(v)}" for k, v in self.node_env(node).items()]
        if lmcache.runs_on(c, node):  # first: a worker's `ray start --block` never returns
            url = lmcache.health_url(node.address, c.lmcache.http_port)
            probe = "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)"
            lines.append(f"{shlex.join(self.lmcache_argv())} > {log / 'lmcache.log'} 2>&1 &")
            lines.append(f"until python3 -c {shlex.quote(probe)} {url} 2>/dev/null; do sleep 1; done")
        lines.append(shlex.join(self.ray_start_argv(node)))
        if node == c.head:
            lines.append(f"{shlex.join(self.serve_argv())} 2>&1 | tee {log / 'vllm-serve.log'}")
        return "\n".join(lines)

    def memory_table(self) -> str:
        rows = [s.row() for s in self.stages]
        cols = list(rows[0])
        widths = [max(len(c), *(len(r[c]) for r in rows)) for c in cols]
        fmt = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))  # noqa: E731
        return "\n".join([fmt(cols)] + [fmt([r[c] for c in cols]) for r in rows])


def plan(cluster: Cluster, dims: ModelDims | None = None) -> LaunchPlan:
    """Partition and memory fit for `cluster` (dims: the checkpoint's config when readable on
    this machine, else DeepSeek-V4-Flash's published dimensions)."""
    if dims is None:
        config = Path(cluster.model) / "config.json"
        dims = ModelDims.from_checkpoint(cluster.model) if config.exists() else ModelDims()
    dep = Deployment(
        gpu_memory_bytes=cluster.gpu_memory_bytes(),
        max_model_len=cluster.context_length,
        max_num_seqs=cluster.max_num_seqs,
        concurrency=cluster.concurrency,
        max_num_batched_tokens=cluster.max_num_batched_tokens,
        pipeline_parallel_size=cluster.pipeline_parallel_size,
        runtime_overhead_bytes=int(cluster.runtime_overhead_gib * 1024**3),
    )
    partition = partition_layers(dims, dep, cluster.pipeline_parallel_size)
    return LaunchPlan(cluster, dims, dep, partition, plan_memory(dims, dep, partition))

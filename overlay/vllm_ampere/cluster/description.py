"""The cluster description: the one small file an operator writes (YAML or JSON).

    model: /models/deepseek-v4-int4-int8   # same path on every node
    context_length: 65536
    interface: eth0                        # NIC between the nodes (NCCL, Gloo)
    nodes:
      - {name: a, address: 10.0.0.1, gpus: 4}
      - {name: b, address: 10.0.0.2, gpus: 4}
      - {name: c, address: 10.0.0.3, gpus: 2}
    lmcache: {enabled: false}              # LMCache 0.5.6 serves DeepSeek-V4 on one node only

The first node is the head (Ray head, API server, LMCache server when enabled). One GPU per
pipeline stage (TP=1, as in the seed's PP=10 deployment), so the pipeline size is the GPU count.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Node(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    address: str  # the IP other nodes reach this one at: VLLM_HOST_IP, ray --node-ip-address
    gpus: int = Field(ge=1, le=16)
    gpu_memory_gib: float | None = Field(default=None, gt=0)  # default: the cluster's

    @field_validator("address")
    @classmethod
    def _ip(cls, v: str) -> str:
        ipaddress.ip_address(v)  # NCCL/Gloo bind by address: a hostname is ambiguous here
        return v


class LMCache(_Strict):
    enabled: bool = True
    l1_size_gb: float = Field(default=32, gt=0)  # CPU RAM of the server's L1 cache
    eviction_policy: str = Field(default="LRU", pattern="^(LRU|ARC|noop)$")
    port: int = Field(default=6555, ge=1, le=65535)  # ZMQ request port
    http_port: int = Field(default=6556, ge=1, le=65535)  # /healthcheck
    node: str | None = None  # where the one server runs; default: the head
    # lmcache_driven: the server pulls KV through CUDA IPC / SHM, so every worker must share its
    # node. engine_driven (workers copy KV over TCP) would reach other nodes, but LMCache 0.5.6
    # registers one KV cache group that way and DeepSeek-V4 has several (see
    # lmcache.validate_topology, which refuses it).
    transfer_mode: str = Field(default="lmcache_driven", pattern="^(engine_driven|lmcache_driven)$")
    servers: int = Field(default=1, ge=1)  # LMCache refuses more than one with PP > 1


class Cluster(_Strict):
    model: str
    served_model_name: str | None = None
    context_length: int = Field(ge=1024)
    max_num_seqs: int = Field(default=6, ge=1)
    concurrency: int = Field(default=1, ge=1)  # requests at context_length at the same time
    max_num_batched_tokens: int = Field(default=2048, ge=256)
    gpu_memory_gib: float = Field(default=24, gt=0)  # RTX 3090
    runtime_overhead_gib: float = Field(default=1.0, ge=0)
    port: int = Field(default=8080, ge=1, le=65535)
    ray_port: int = Field(default=6379, ge=1, le=65535)
    interface: str = Field(pattern=r"^[A-Za-z0-9_.:-]+$")
    nvlink: bool = False  # 3090 pairs with NVLink bridges: keep NCCL P2P over NVLink only
    log_dir: str = "/var/log/vllm-ampere"
    nodes: list[Node] = Field(min_length=1)
    lmcache: LMCache = LMCache()

    @model_validator(mode="after")
    def _consistent(self) -> Cluster:
        names = [n.name for n in self.nodes]
        addresses = [n.address for n in self.nodes]
        for what, values in (("name", names), ("address", addresses)):
            dup = sorted({v for v in values if values.count(v) > 1})
            if dup:
                raise ValueError(f"node {what}s must be unique, repeated: {dup}")
        if self.lmcache.node is not None and self.lmcache.node not in names:
            raise ValueError(f"lmcache.node {self.lmcache.node!r} is not one of the nodes {names}")
        return self

    @property
    def head(self) -> Node:
        return self.nodes[0]

    @property
    def pipeline_parallel_size(self) -> int:
        return sum(n.gpus for n in self.nodes)

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise ValueError(f"no node named {name!r}; the nodes are {[n.name for n in self.nodes]}")

    def gpu_memory_bytes(self) -> int:
        """The smallest GPU: every stage must fit on whichever GPU Ray gives it."""
        gib = min(n.gpu_memory_gib or self.gpu_memory_gib for n in self.nodes)
        return int(gib * 1024**3)


def load_cluster(path: str | Path) -> Cluster:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"{path}: cannot read the cluster description: {e}") from e
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: not valid {path.suffix.lstrip('.') or 'YAML'}: {e}") from e
    try:
        return Cluster.model_validate(data)
    except ValidationError as e:
        raise ValueError(f"{path}: {e}") from e

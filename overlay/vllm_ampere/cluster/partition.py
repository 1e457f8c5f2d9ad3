"""VLLM_PP_LAYER_PARTITION: contiguous layer counts per pipeline stage.

vLLM's default (vllm/distributed/utils.py get_pp_indices) gives every stage
num_layers // pp layers and spreads the remainder over the stages before the last, blind to
what else a stage holds. Here the cost of a stage is its memory need (memory.stage_cost):
weights (the embedding on the first stage and the head on the last weigh about 0.3 of a
layer each), context and window KV caches, workspaces. The partition minimises the largest
stage, then the spread (sum of squares), so the embedding and head stages get fewer layers.
"""

from __future__ import annotations

from functools import lru_cache

from vllm_ampere.cluster.memory import Deployment, LayerTable, stage_cost
from vllm_ampere.cluster.model import ModelDims


def partition_layers(dims: ModelDims, dep: Deployment, num_stages: int) -> list[int]:
    n = dims.num_hidden_layers
    if not 1 <= num_stages <= n:
        raise ValueError(f"pipeline size {num_stages} must be between 1 and {n} (the layers)")

    table = LayerTable.build(dims, dep)

    @lru_cache(maxsize=None)
    def cost(stage: int, start: int, stop: int) -> int:
        return stage_cost(dims, dep, table, stage, range(start, stop), num_stages)

    # best[s][i]: (max, sum of squares, counts) for layers i.. over stages s..num_stages-1.
    @lru_cache(maxsize=None)
    def best(stage: int, start: int) -> tuple[int, int, tuple[int, ...]]:
        left = num_stages - stage
        if left == 1:
            c = cost(stage, start, n)
            return c, c * c, (n - start,)
        options = []
        for stop in range(start + 1, n - left + 2):
            c = cost(stage, start, stop)
            rest_max, rest_sq, rest = best(stage + 1, stop)
            options.append((max(c, rest_max), c * c + rest_sq, (stop - start,) + rest))
        return min(options)

    return list(best(0, 0)[2])


def partition_env(partition: list[int]) -> str:
    return ",".join(str(n) for n in partition)

"""Per-stage GPU memory of a pipeline-parallel DeepSeek-V4-Flash deployment at a context length.

A stage holds its layers' weights, its layers' KV caches, the activation workspaces of one
step, and the runtime's own memory. vLLM sizes its KV pool to fill whatever its budget leaves,
so a stage that "fits" can still die on an allocation the memory profile did not see: the
seed's 200k run lost PP rank 9 to a 114 MiB FlashMLA allocation with 95.75 MiB free while the
KV cache was only 19.2% used. The check therefore (1) caps the KV pool with
`--kv-cache-memory-bytes` at what `concurrency` requests of the context need, and (2) demands
that what is left after weights, KV, activations and runtime covers the largest context-scaled
attention transient plus an allocator margin, on every stage. Each refusal names the stage and
numbers.

The KV pool is sized by vLLM's own accounting (v1/core/kv_cache_utils.py), run here on the
specs DeepSeek-V4 registers (fp8_ds_mla): per layer an SWA cache (window 128, 64-token blocks,
sparse_swa.py), and for a ratio-r layer its compressed KV (256-token blocks, attention.py) and
compressor state (4- or 8-token blocks, compressor.py), for r = 4 also the indexer K cache and
its compressor's state. get_kv_cache_groups packs them into groups over the whole model; one
block of a worker's pool holds a page of each of its layers in the widest group
(_pool_bytes_per_block), and a request reserves, per group, cdiv(max_model_len, 256) blocks
for a context cache and cdiv(min(window - 1 + max_in_flight_tokens, max_model_len), block) + 1
for a sliding one (SlidingWindowSpec.max_admission_blocks_per_request: the scheduler admits a
request only once these fit). With PP, max_in_flight_tokens = (PP + 1) * max_num_batched_tokens
(config/vllm.py), so a 4-token state block is reserved for ~22k tokens per request at PP=10:
the window caches, not the context, dominate. Every worker gets the same
`--kv-cache-memory-bytes` and all take the smallest block count, so the pool is the largest
stage's `concurrency` requests plus the null block (get_kv_cache_configs).
Workspaces (one per worker, shared by its layers; v1/worker/workspace.py):
- FlashMLA prefill gather, bf16 (PREFILL_CHUNK_SIZE=4, M, 512), M = ceil(max_len/r) + window
  + max_num_batched_tokens (nvidia/flashmla.py forward_mqa dummy-run reservation);
- indexer K gather: max_len * (576*2//132) * factor / 4 rows of 132 B, factor 5 up to 256k
  else 2 (v1/attention/backends/mla/indexer.py get_max_prefill_buffer_size; config/vllm.py);
- indexer logits: VLLM_SPARSE_INDEXER_MAX_LOGITS_MB (512) reserved in the profile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING

from vllm_ampere.cluster.model import (
    BF16,
    FP32,
    ModelDims,
    compressor_coff,
    embedding_bytes,
    head_bytes,
    largest_expert_tensor_bytes,
    layer_weight_bytes,
)

if TYPE_CHECKING:
    from vllm.v1.kv_cache_interface import KVCacheSpec

GiB = 1024**3
MiB = 1024**2

KV_BLOCK = 256  # DeepSeek-V4 attention block size (tokens)
FP8_DS_MLA_STATE = 584  # bytes per stored state
PAGE_ALIGN = 576  # fp8_ds_mla page alignment
INDEXER_STATE = 128 + 4  # fp8 K + fp32 scale
SWA_BLOCK = 64
PREFILL_CHUNK_SIZE = 4  # DeepseekV4Attention.PREFILL_CHUNK_SIZE
INDEXER_LOGITS_MB = 512  # VLLM_SPARSE_INDEXER_MAX_LOGITS_MB default
RADIX_TOPK_WORKSPACE = 1 * MiB
KV_CAP_ROUND = 64 * MiB


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def layer_kv_cache_specs(dims: ModelDims, layer: int) -> dict[str, KVCacheSpec]:
    """The KV cache specs decoder layer `layer` registers in vLLM, in registration order, as its
    modules build them under `--kv-cache-dtype fp8` (turned into fp8_ds_mla): the indexer's K
    cache and compressor state (attention.py DeepseekV4IndexerCache, compressor.py
    CompressorStateCache), the SWA cache (sparse_swa.py DeepseekV4SWACache), the compressed KV
    (attention.py DeepseekV4Attention), the compressor state (kv + score, coff sets, fp32)."""
    import torch
    from vllm.v1.kv_cache_interface import (
        MLAAttentionSpec,
        SlidingWindowMLASpec,
        get_kv_quant_mode,
    )

    r, prefix = dims.ratios[layer], f"model.layers.{layer}.attn"
    common = dict(num_kv_heads=1, max_tp_shards=1, alignment=PAGE_ALIGN)
    packed = dict(dtype=torch.uint8, cache_dtype_str="fp8_ds_mla", model_version="deepseek_v4",
                  kv_quant_mode=get_kv_quant_mode("fp8_ds_mla"),
                  state_content_bytes=FP8_DS_MLA_STATE, **common)

    def state(head_dim: int, coff: int) -> KVCacheSpec:
        return SlidingWindowMLASpec(block_size=4 if r == 4 else 8, head_size=2 * coff * head_dim,
                                    dtype=torch.float32, sliding_window=coff * r, **common)

    specs: dict[str, KVCacheSpec] = {}
    if r == 4:
        specs[f"{prefix}.indexer.k_cache"] = MLAAttentionSpec(
            block_size=KV_BLOCK, head_size=INDEXER_STATE, dtype=torch.uint8, tokens_per_state=r,
            **common)
        specs[f"{prefix}.indexer.compressor.state_cache"] = state(dims.index_head_dim,
                                                                  compressor_coff(r))
    specs[f"{prefix}.swa_cache"] = SlidingWindowMLASpec(
        block_size=SWA_BLOCK, head_size=dims.head_dim, sliding_window=dims.sliding_window,
        **packed)
    if r > 1:
        specs[prefix] = MLAAttentionSpec(block_size=KV_BLOCK, head_size=dims.head_dim,
                                         tokens_per_state=r, **packed)
        specs[f"{prefix}.compressor.state_cache"] = state(dims.head_dim, compressor_coff(r))
    return specs


def sizing_config(dep: Deployment) -> SimpleNamespace:
    """What vLLM's KV sizing reads of its VllmConfig (get_kv_cache_groups, the specs'
    max_memory_usage_bytes, _pool_bytes_per_block), as `vllm serve` resolves it here."""
    from vllm.v1.kv_cache_layout import KVCacheLayout

    return SimpleNamespace(
        model_config=SimpleNamespace(max_model_len=dep.max_model_len),
        parallel_config=SimpleNamespace(decode_context_parallel_size=1),
        # The hybrid manager stays on: LMCache 0.5.6's LMCacheMPConnector implements
        # SupportsHMA (config/vllm.py __post_init__ turns it off only for connectors without).
        scheduler_config=SimpleNamespace(disable_hybrid_kv_cache_manager=False),
        attention_config=SimpleNamespace(hisparse_config=None),
        speculative_config=None,
        # DeepSeek-V4's indexer backend takes block-outer layouts only, BLHNC first
        # (v1/attention/backends/mla/indexer.py supported_kv_cache_layouts).
        cache_config=SimpleNamespace(get_resolved_kv_cache_layout=lambda: KVCacheLayout.BLHNC),
        # config/vllm.py max_concurrent_batches: PP + 1 with async scheduling, which vLLM turns
        # on for PP with its default V2 model runner (PP without it: this pool then admits more).
        max_in_flight_tokens=(dep.pipeline_parallel_size + 1) * dep.max_num_batched_tokens,
    )


class KVSizing:
    """vLLM's KV cache groups of the whole model (get_kv_cache_configs groups the merged specs
    of all workers), projected on one stage's layers at a time."""

    def __init__(self, dims: ModelDims, dep: Deployment):
        from vllm.v1.core.kv_cache_utils import get_kv_cache_groups

        self.config = sizing_config(dep)
        self.specs = [layer_kv_cache_specs(dims, i) for i in range(dims.num_hidden_layers)]
        merged = {name: spec for layer in self.specs for name, spec in layer.items()}
        self.groups = get_kv_cache_groups(self.config, merged)
        self._stages: dict[tuple[int, int], tuple[int, int]] = {}  # the partitioner asks often

    def stage(self, layers: range) -> tuple[int, int]:
        """(bytes one request of max_model_len reserves, bytes of one block) on a stage holding
        `layers`: the figures vLLM's startup check and admission use."""
        key = (layers.start, layers.stop)
        if key not in self._stages:
            from vllm.v1.core import kv_cache_utils as kvu

            worker = {name: spec for i in layers for name, spec in self.specs[i].items()}
            groups = kvu._project_kv_cache_groups_to_worker(self.groups, worker)
            self._stages[key] = (kvu._max_memory_usage_bytes_from_groups(self.config, groups),
                                 kvu._pool_bytes_per_block(self.config, groups))
        return self._stages[key]


def indexer_prefill_rows(max_model_len: int) -> int:
    factor = 5 if max_model_len <= 256 * 1024 else 2
    return max_model_len * (576 * 2 // 132) * factor // 4


def prefill_gather_bytes(dims: ModelDims, ratio: int, max_model_len: int,
                         max_num_batched_tokens: int) -> int:
    """The bf16 K gather of a prefill chunk group (PREFILL_CHUNK_SIZE requests) in a ratio-r
    layer: its compressed context (none for SWA-only layers), window and new tokens."""
    compressed = math.ceil(max_model_len / ratio) if ratio > 1 else 0
    m = compressed + dims.sliding_window + max_num_batched_tokens
    return PREFILL_CHUNK_SIZE * m * dims.head_dim * BF16


def attention_workspace_bytes(dims: ModelDims, layers: range, max_model_len: int,
                              max_num_batched_tokens: int) -> int:
    """The worker's shared attention workspace (the largest simultaneous reservation)."""
    sizes = [0]
    for r in {dims.ratios[layer] for layer in layers}:
        top_k = dims.index_topk if r > 1 else 0
        combined = _round_up(top_k + dims.sliding_window, 128)
        sizes.append(
            prefill_gather_bytes(dims, r, max_model_len, max_num_batched_tokens)
            + max_num_batched_tokens * combined * 4
            + max_num_batched_tokens * 4
        )
        if r == 4:
            sizes.append(indexer_prefill_rows(max_model_len) * INDEXER_STATE + RADIX_TOPK_WORKSPACE)
    return max(sizes)


def attention_transient_bytes(dims: ModelDims, layers: range, max_model_len: int,
                              max_num_batched_tokens: int) -> int:
    """The largest context-scaled allocation of one attention step, the prefill gather of the
    most compressed-KV-heavy layer (smallest ratio). A kernel or workspace that allocates it
    beside the profiled reservation needs it free (see module doc)."""
    ratios = [dims.ratios[layer] for layer in layers if dims.ratios[layer] > 1]
    if not ratios:
        return 0
    return prefill_gather_bytes(dims, min(ratios), max_model_len, max_num_batched_tokens)


def pp_receive_bytes(dims: ModelDims, tokens: int) -> int:
    """The persistent buffer a non-first pipeline stage receives hidden states into (vLLM 0.32.0
    GPUModelRunner: make_empty_intermediate_tensors(max_num_tokens); DeepSeek-V4 sends its
    hyper-connection streams, [tokens, hc_mult, hidden] in the model dtype)."""
    return tokens * dims.hc_mult * dims.hidden_size * BF16


def step_activation_bytes(dims: ModelDims, tokens: int) -> int:
    """Live activations of one layer for `tokens` tokens at the peak (attention or MoE)."""
    h = dims.hidden_size
    residual = 2 * tokens * dims.hc_mult * h * BF16  # hyper-connection streams in and out
    q_and_o = 2 * tokens * dims.num_attention_heads * dims.head_dim * BF16
    k, i = dims.num_experts_per_tok, dims.moe_intermediate_size
    moe = tokens * k * (2 * i + i + h) * BF16 + tokens * k * (FP32 + 4)  # caches + weights, ids
    return residual + max(q_and_o, moe)


@dataclass(frozen=True)
class Deployment:
    """What the memory fit needs to know about one serving configuration."""

    gpu_memory_bytes: int
    max_model_len: int
    max_num_seqs: int = 1
    concurrency: int = 1  # requests that hold max_model_len tokens at once
    max_num_batched_tokens: int = 2048
    pipeline_parallel_size: int = 1
    runtime_overhead_bytes: int = 1 * GiB  # CUDA context, cuBLAS/NCCL buffers, CUDA graphs
    allocator_margin_bytes: int = 256 * MiB  # fragmentation slack kept free on every stage
    # None: cap the KV pool with --kv-cache-memory-bytes (what `render` does). A fraction:
    # vLLM's default sizing, the pool fills util * GPU and only (1 - util) * GPU stays free.
    gpu_memory_utilization: float | None = None


@dataclass
class StageMemory:
    stage: int
    layers: range
    weights: int
    kv_request: int  # what vLLM reserves here per request of max_model_len (KVSizing.stage)
    kv_needed: int  # concurrency such requests + the null block
    kv_pool: int  # what vLLM allocates: --kv-cache-memory-bytes, the same on every stage
    workspace: int
    activations: int
    overhead: int
    load_transient: int
    attention_transient: int
    margin: int
    gpu: int
    problems: list[str] = field(default_factory=list)

    @property
    def resident(self) -> int:
        """Everything the stage holds while serving."""
        return self.weights + self.kv_pool + self.workspace + self.activations + self.overhead

    @property
    def free(self) -> int:
        return self.gpu - self.resident

    @property
    def needs_free(self) -> int:
        return self.attention_transient + self.margin

    def row(self) -> dict[str, str]:
        g = lambda b: f"{b / GiB:.2f}"  # noqa: E731
        return {
            "stage": str(self.stage),
            "layers": f"{self.layers.start}-{self.layers.stop - 1} ({len(self.layers)})",
            "weights": g(self.weights),
            "KV need/pool": f"{g(self.kv_needed)}/{g(self.kv_pool)}",
            "work+act": g(self.workspace + self.activations),
            "runtime": g(self.overhead),
            "free": g(self.free),
            "needs free": g(self.needs_free),
            "ok": "yes" if not self.problems else "NO",
        }


@dataclass(frozen=True)
class LayerTable:
    """Per-layer figures of one deployment, computed once (the partitioner asks often)."""

    weights: tuple[int, ...]
    kv: KVSizing

    @classmethod
    def build(cls, dims: ModelDims, dep: Deployment) -> LayerTable:
        layers = range(dims.num_hidden_layers)
        return cls(weights=tuple(layer_weight_bytes(dims, i) for i in layers),
                   kv=KVSizing(dims, dep))


def _stage_parts(dims: ModelDims, dep: Deployment, table: LayerTable, stage: int,
                 layers: range, num_stages: int) -> dict[str, int]:
    weights = sum(table.weights[layers.start:layers.stop])
    if stage == 0:
        weights += embedding_bytes(dims)
    if stage == num_stages - 1:
        weights += head_bytes(dims)
    # Reserved at model init: topk indices buffer [max_num_batched_tokens, index_topk] int32.
    weights += dep.max_num_batched_tokens * dims.index_topk * 4
    if stage > 0:  # and the PP receive buffer, [max_num_batched_tokens, hc_mult, hidden] BF16
        weights += pp_receive_bytes(dims, dep.max_num_batched_tokens)
    activations = step_activation_bytes(dims, dep.max_num_batched_tokens)
    if any(dims.ratios[layer] == 4 for layer in layers):
        activations += INDEXER_LOGITS_MB * MiB
    if stage == num_stages - 1:  # logits of the sampled rows (fp32), twice for the sampler
        activations += 2 * dep.max_num_seqs * dims.vocab_size * FP32
    kv_request, kv_block = table.kv.stage(layers)
    return {
        "weights": weights,
        "kv_request": kv_request,
        # The block pool holds one null block back (get_kv_cache_configs check_memory).
        "kv_needed": dep.concurrency * kv_request + kv_block,
        "workspace": attention_workspace_bytes(dims, layers, dep.max_model_len,
                                               dep.max_num_batched_tokens),
        "activations": activations,
        "attention_transient": attention_transient_bytes(dims, layers, dep.max_model_len,
                                                         dep.max_num_batched_tokens),
    }


def _check(s: StageMemory, dep: Deployment) -> None:
    g = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
    where = f"stage {s.stage} (layers {s.layers.start}-{s.layers.stop - 1})"
    need = (f"vLLM reserves {g(s.kv_request)} here per request of {dep.max_model_len} tokens, "
            f"{g(s.kv_needed)} for {dep.concurrency}")
    if s.kv_pool < s.kv_needed:
        s.problems.append(f"{where}: the KV pool of {g(s.kv_pool)} is too small ({need})")
    if s.free < 0:
        s.problems.append(
            f"{where} does not fit {g(s.gpu)}: weights {g(s.weights)} + KV pool "
            f"{g(s.kv_pool)} ({need}) + workspace {g(s.workspace)} + activations "
            f"{g(s.activations)} + runtime {g(s.overhead)} = {g(s.resident)}"
        )
    elif s.free < s.needs_free:
        s.problems.append(
            f"{where} leaves {g(s.free)} free, below the {g(s.attention_transient)} attention "
            f"transient at {dep.max_model_len} tokens + {g(s.margin)} allocator margin: it would "
            f"run out of headroom mid-request while its KV cache is "
            f"{100 * s.kv_needed / s.kv_pool:.0f}% used"
        )
    # Loading repacks one layer's experts into a new buffer before freeing the old one.
    if s.weights + s.load_transient + s.overhead > s.gpu:
        s.problems.append(
            f"{where} cannot load: weights {g(s.weights)} + the repack of one layer's "
            f"experts {g(s.load_transient)} + runtime {g(s.overhead)} > {g(s.gpu)}"
        )


def plan_memory(dims: ModelDims, dep: Deployment, partition: list[int]) -> list[StageMemory]:
    """Every stage's memory for `partition`, with its problems (empty when it fits)."""
    starts = [sum(partition[:i]) for i in range(len(partition))]
    layers = [range(a, a + n) for a, n in zip(starts, partition)]
    table = LayerTable.build(dims, dep)
    parts = [_stage_parts(dims, dep, table, i, r, len(partition)) for i, r in enumerate(layers)]
    cap = kv_cache_memory_bytes(parts)
    stages = []
    for i, (r, p) in enumerate(zip(layers, parts)):
        pool = cap
        if dep.gpu_memory_utilization is not None:
            others = p["weights"] + p["workspace"] + p["activations"] + dep.runtime_overhead_bytes
            pool = max(0, int(dep.gpu_memory_utilization * dep.gpu_memory_bytes) - others)
        s = StageMemory(stage=i, layers=r, kv_pool=pool, overhead=dep.runtime_overhead_bytes,
                        load_transient=largest_expert_tensor_bytes(dims),
                        margin=dep.allocator_margin_bytes, gpu=dep.gpu_memory_bytes, **p)
        _check(s, dep)
        stages.append(s)
    return stages


def stage_cost(dims: ModelDims, dep: Deployment, table: LayerTable, stage: int,
               layers: range, num_stages: int) -> int:
    """Bytes a stage needs (its own KV need, not the shared pool): the partitioner's cost."""
    p = _stage_parts(dims, dep, table, stage, layers, num_stages)
    return (p["weights"] + p["kv_needed"] + p["workspace"] + p["activations"]
            + p["attention_transient"])


def kv_cache_memory_bytes(parts: list[dict[str, int]]) -> int:
    """`--kv-cache-memory-bytes`: vLLM gives every worker this pool, so it is the largest
    stage's need, rounded up to 64 MiB."""
    return _round_up(max(p["kv_needed"] for p in parts), KV_CAP_ROUND)

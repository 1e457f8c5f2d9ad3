"""Per-stage GPU memory of a pipeline-parallel DeepSeek-V4-Flash deployment at a context length.

A stage holds its layers' weights, its layers' KV caches, the activation workspaces of one
step, and the runtime's own memory. vLLM sizes its KV pool to fill whatever its budget leaves,
so a stage that "fits" can still die on an allocation the memory profile did not see: the
seed's 200k run lost PP rank 9 to a 114 MiB FlashMLA allocation with 95.75 MiB free while the
KV cache was only 19.2% used. The check therefore (1) caps the KV pool with
`--kv-cache-memory-bytes` at what the requested context needs, and (2) demands that what is
left after weights, KV, activations and runtime covers the largest context-scaled attention
transient plus an allocator margin, on every stage. Each refusal names the stage and numbers.

KV layouts are the pinned vLLM's (fp8_ds_mla, block 256 tokens):
- compressed KV of a ratio-r layer (attention.py get_kv_cache_spec): 256/r states of 584 B
  (448 e4m3 NoPE + 64 BF16 RoPE + 8 UE8M0 scale bytes), page padded to a multiple of 576 B;
- indexer K cache of a ratio-4 layer (DeepseekV4Indexer): 64 states of 132 B (128 fp8 +
  one fp32 scale), page padded to 576;
- sliding caches, bounded per request, in pages of the common page size (v1/core/
  kv_cache_utils.py unify_kv_cache_spec_page_size pads non-MLA specs to the largest page):
  SWA window 128 (block 64, sparse_swa.py), compressor states fp32 (compressor.py
  CompressorStateCache: 2*coff*head_dim floats, block 4 for r=4, 8 for r=128; window coff*r),
  the indexer compressor's state likewise with head 128. Out-of-window blocks are freed per
  processed token, so each holds window + in-flight tokens, and with PP the in-flight tokens
  are PP * max_num_batched_tokens (config/vllm.py max_in_flight_tokens).
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


def compressed_page_bytes(ratio: int) -> int:
    """Page of a ratio-r layer's compressed KV (256 tokens)."""
    return _round_up(KV_BLOCK // ratio * FP8_DS_MLA_STATE, PAGE_ALIGN)


def indexer_page_bytes() -> int:
    return _round_up(KV_BLOCK // 4 * INDEXER_STATE, PAGE_ALIGN)


def common_page_bytes() -> int:
    """The page every cache group is padded to: the ratio-4 compressed KV / SWA page."""
    return compressed_page_bytes(4)


def layer_kv_bytes_per_token(dims: ModelDims, layer: int) -> float:
    """Bytes per context token of `layer`'s caches that grow with the context."""
    r = dims.ratios[layer]
    total = 0.0
    if r > 1:
        total += compressed_page_bytes(r) / KV_BLOCK
    if r == 4:
        total += indexer_page_bytes() / KV_BLOCK
    return total


def full_kv_bytes_per_token(dims: ModelDims, layers: range) -> float:
    return sum(layer_kv_bytes_per_token(dims, layer) for layer in layers)


def sliding_caches(dims: ModelDims, layer: int) -> list[tuple[str, int, int]]:
    """(name, tokens per page, window in tokens) of each bounded cache of `layer`."""
    r = dims.ratios[layer]
    caches = [("swa", SWA_BLOCK, dims.sliding_window)]
    if r > 1:
        caches.append(("compressor_state", 4 if r == 4 else 8, compressor_coff(r) * r))
    if r == 4:
        caches.append(("indexer_compressor_state", 4, 2 * r))
    return caches


def layer_sliding_kv_bytes(dims: ModelDims, layer: int, seqs: int, in_flight_tokens: int) -> int:
    """Bytes of `layer`'s bounded caches for `seqs` running requests and the tokens in flight."""
    page = common_page_bytes()
    total = 0
    for _, tokens_per_page, window in sliding_caches(dims, layer):
        tokens = seqs * (window - 1) + in_flight_tokens
        # +1 page per request: a window need not start on a page boundary.
        total += (math.ceil(tokens / tokens_per_page) + seqs) * page
    return total


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
    kv_full: int  # context caches this stage needs at max_model_len x concurrency
    kv_sliding: int  # window caches of max_num_seqs requests + the tokens in flight
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
    def kv_needed(self) -> int:
        return self.kv_full + self.kv_sliding

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
    kv_per_token: tuple[float, ...]
    sliding: tuple[int, ...]

    @classmethod
    def build(cls, dims: ModelDims, dep: Deployment) -> LayerTable:
        layers = range(dims.num_hidden_layers)
        in_flight = dep.pipeline_parallel_size * dep.max_num_batched_tokens
        return cls(
            weights=tuple(layer_weight_bytes(dims, i) for i in layers),
            kv_per_token=tuple(layer_kv_bytes_per_token(dims, i) for i in layers),
            sliding=tuple(layer_sliding_kv_bytes(dims, i, dep.max_num_seqs, in_flight)
                          for i in layers),
        )


def _stage_parts(dims: ModelDims, dep: Deployment, table: LayerTable, stage: int,
                 layers: range, num_stages: int) -> dict[str, int]:
    weights = sum(table.weights[layers.start:layers.stop])
    if stage == 0:
        weights += embedding_bytes(dims)
    if stage == num_stages - 1:
        weights += head_bytes(dims)
    # Reserved at model init: topk indices buffer [max_num_batched_tokens, index_topk] int32.
    weights += dep.max_num_batched_tokens * dims.index_topk * 4
    activations = step_activation_bytes(dims, dep.max_num_batched_tokens)
    if any(dims.ratios[layer] == 4 for layer in layers):
        activations += INDEXER_LOGITS_MB * MiB
    if stage == num_stages - 1:  # logits of the sampled rows (fp32), twice for the sampler
        activations += 2 * dep.max_num_seqs * dims.vocab_size * FP32
    return {
        "weights": weights,
        "kv_full": math.ceil(
            sum(table.kv_per_token[layers.start:layers.stop]) * dep.max_model_len
            * dep.concurrency
        ),
        "kv_sliding": sum(table.sliding[layers.start:layers.stop]),
        "workspace": attention_workspace_bytes(dims, layers, dep.max_model_len,
                                               dep.max_num_batched_tokens),
        "activations": activations,
        "attention_transient": attention_transient_bytes(dims, layers, dep.max_model_len,
                                                         dep.max_num_batched_tokens),
    }


def _check(s: StageMemory, max_model_len: int) -> None:
    g = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
    where = f"stage {s.stage} (layers {s.layers.start}-{s.layers.stop - 1})"
    if s.kv_pool < s.kv_needed:
        s.problems.append(
            f"{where}: the KV pool of {g(s.kv_pool)} holds less than the {g(s.kv_needed)} "
            f"this stage needs ({g(s.kv_full)} for the context, {g(s.kv_sliding)} for windows)"
        )
    if s.free < 0:
        s.problems.append(
            f"{where} does not fit {g(s.gpu)}: weights {g(s.weights)} + KV pool "
            f"{g(s.kv_pool)} (this stage needs {g(s.kv_full)} for the context, "
            f"{g(s.kv_sliding)} for windows) + workspace {g(s.workspace)} + activations "
            f"{g(s.activations)} + runtime {g(s.overhead)} = {g(s.resident)}"
        )
    elif s.free < s.needs_free:
        s.problems.append(
            f"{where} leaves {g(s.free)} free, below the {g(s.attention_transient)} attention "
            f"transient at {max_model_len} tokens + {g(s.margin)} allocator margin: it would "
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
        _check(s, dep.max_model_len)
        stages.append(s)
    return stages


def stage_cost(dims: ModelDims, dep: Deployment, table: LayerTable, stage: int,
               layers: range, num_stages: int) -> int:
    """Bytes a stage needs (its own KV need, not the shared pool): the partitioner's cost."""
    p = _stage_parts(dims, dep, table, stage, layers, num_stages)
    return (p["weights"] + p["kv_full"] + p["kv_sliding"] + p["workspace"] + p["activations"]
            + p["attention_transient"])


def kv_cache_memory_bytes(parts: list[dict[str, int]]) -> int:
    """`--kv-cache-memory-bytes`: vLLM gives every worker this pool, so it is the largest
    stage's need (context caches + window caches), rounded up to 64 MiB."""
    return _round_up(max(p["kv_full"] + p["kv_sliding"] for p in parts), KV_CAP_ROUND)

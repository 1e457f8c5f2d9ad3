"""Layer partition and per-stage memory fit on DeepSeek-V4-Flash's real dimensions."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vllm_ampere.cluster import memory
from vllm_ampere.cluster.description import load_cluster
from vllm_ampere.cluster.memory import GiB, Deployment, plan_memory
from vllm_ampere.cluster.model import (
    ModelDims,
    embedding_bytes,
    head_bytes,
    int4_linear,
    layer_weight_bytes,
)
from vllm_ampere.cluster.partition import partition_env, partition_layers
from vllm_ampere.cluster.render import plan

FLASH = ModelDims()
CONTEXTS = {"16k": 16384, "64k": 65536, "200k": 204800}
EXAMPLE = Path(__file__).resolve().parents[2] / "docker/cluster.example.yaml"


def deployment(pp: int, ctx: int, **kw) -> Deployment:
    # The seed's serving shape: max_num_seqs 6, max_num_batched_tokens 2048, RTX 3090s.
    return Deployment(gpu_memory_bytes=24 * GiB, max_model_len=ctx, max_num_seqs=6,
                      max_num_batched_tokens=2048, pipeline_parallel_size=pp, **kw)


def test_flash_dims_follow_the_published_config():
    assert len(FLASH.ratios) == 43
    assert FLASH.ratios[:4] == (1, 1, 4, 128) and FLASH.ratios[-1] == 4
    assert FLASH.ratios.count(4) == 21 and FLASH.ratios.count(128) == 20
    # The published list has a 44th (MTP) entry; layer dims must ignore it.
    assert ModelDims.from_config({"compress_ratios": list(FLASH.compress_ratios)}) == FLASH


def test_model_size_matches_the_model_card():
    """284B parameters: the INT4 experts dominate, so bytes ~ 0.5625 B/param there."""
    routed = 43 * 256 * 3 * 2048 * 4096
    assert 276e9 < routed < 278e9
    total = sum(layer_weight_bytes(FLASH, i) for i in range(43))
    total += embedding_bytes(FLASH) + head_bytes(FLASH)
    experts = 43 * 256 * (2 * int4_linear(2048, 4096) + int4_linear(4096, 2048))
    assert experts == routed * 9 // 16  # 4 bits + a BF16 scale per 32
    # Dense INT8 + BF16 embedding/head: a few GB on top of the experts.
    assert 5e9 < total - experts < 9e9, total - experts


@pytest.mark.parametrize("pp", [8, 10, 12])
@pytest.mark.parametrize("ctx", list(CONTEXTS.values()), ids=list(CONTEXTS))
def test_partition_and_fit(pp, ctx, monkeypatch):
    dep = deployment(pp, ctx)
    part = partition_layers(FLASH, dep, pp)
    assert len(part) == pp and sum(part) == 43 and min(part) >= 1
    # Embedding and head stages never hold more layers than the fullest middle stage.
    assert max(part[0], part[-1]) <= max(part[1:-1])
    # The real vLLM accepts the partition and maps stages to these layers.
    from vllm.distributed.utils import get_pp_indices

    monkeypatch.setenv("VLLM_PP_LAYER_PARTITION", partition_env(part))
    assert [get_pp_indices(43, r, pp) for r in range(pp)] == [
        (sum(part[:r]), sum(part[: r + 1])) for r in range(pp)
    ]
    stages = plan_memory(FLASH, dep, part)
    problems = [p for s in stages for p in s.problems]
    if pp == 8:
        # Six 3.5 GiB layers leave no room on a 24 GiB card to repack one layer's experts while
        # loading, whatever the context: refused, with numbers.
        assert problems and all("GiB" in p for p in problems)
        assert any("cannot load: weights" in p for p in problems)
    else:
        assert problems == [], problems
        assert all(s.free >= s.needs_free for s in stages)
    # The KV pool is the largest stage's need, the same on all stages, and covers every stage.
    assert len({s.kv_pool for s in stages}) == 1
    assert all(s.kv_needed <= s.kv_pool for s in stages)


def test_later_stages_hold_the_pp_receive_buffer():
    """Stages after the first keep vLLM's persistent buffer for the hidden states they receive:
    DeepSeek-V4's 4 hyper-connection streams of 4096 BF16 values per batched token."""
    dep = deployment(10, CONTEXTS["64k"])  # max_num_batched_tokens 2048
    table = memory.LayerTable.build(FLASH, dep)
    layers = range(10, 14)  # the same layers, as the first, a middle and the last stage

    def weights(stage):
        return memory._stage_parts(FLASH, dep, table, stage, layers, 10)["weights"]

    assert memory.pp_receive_bytes(FLASH, 2048) == 2048 * 4 * 4096 * 2 == 64 * 2**20
    assert weights(5) - (weights(0) - embedding_bytes(FLASH)) == 64 * 2**20
    assert weights(9) - head_bytes(FLASH) == weights(5)


def test_kv_and_transient_grow_with_the_context():
    pools = []
    for ctx in CONTEXTS.values():
        dep = deployment(10, ctx)
        stages = plan_memory(FLASH, dep, partition_layers(FLASH, dep, 10))
        pools.append((stages[1].kv_request, stages[1].attention_transient))
    kv, transient = zip(*pools)
    assert list(kv) == sorted(kv) and list(transient) == sorted(transient) and transient[0] < transient[-1]
    # vLLM reserves the window caches for min((PP + 1) * 2048 + window - 1, max_model_len) tokens
    # per request, in 4- and 8-token state blocks: at PP=10 they dwarf the context caches, so
    # a request at 200k reserves less than 1.5 times one at 16k.
    assert kv[0] < kv[-1] < 1.5 * kv[0]


def test_seed_200k_case_is_explained_as_headroom_not_kv():
    """vLLM's default sizing fills util * GPU with KV; at 200k the attention transient then
    finds too little free memory while the KV cache is mostly empty (seed: rank 9, 114 MiB
    requested, 95.75 MiB free, KV 19.2% used)."""
    dep = deployment(10, 204800, gpu_memory_utilization=0.99)
    stages = plan_memory(FLASH, dep, partition_layers(FLASH, dep, 10))
    last = stages[-1]
    assert last.problems, "a 0.99 budget leaves no headroom for the 200k attention transient"
    msg = last.problems[0]
    assert "stage 9" in msg and "attention transient at 204800 tokens" in msg
    # Even vLLM's full reservation for one 200k request (0.9 GiB here, mostly window caches)
    # is a small part of the 6.6 GiB pool that 0.99 * 24 GiB leaves.
    assert "KV cache is" in msg and last.kv_needed / last.kv_pool < 0.5
    # The cap `render` uses instead (1.4 GiB) leaves each stage gigabytes free.
    capped = plan_memory(FLASH, deployment(10, 204800), partition_layers(FLASH, dep, 10))
    assert not any(s.problems for s in capped) and min(s.free for s in capped) > 2 * GiB


def test_load_transient_refusal():
    """Repacking one layer's experts (2.25 GiB) needs room beside the loaded weights."""
    dep = Deployment(gpu_memory_bytes=int(17.5 * GiB), max_model_len=16384,
                     pipeline_parallel_size=10)
    stages = plan_memory(FLASH, dep, [4, 4, 4, 4, 4, 4, 5, 5, 5, 4])
    assert any("cannot load" in p and "repack" in p for p in stages[6].problems)


def test_bad_partition_sizes():
    with pytest.raises(ValueError, match="between 1 and 43"):
        partition_layers(FLASH, deployment(44, 16384), 44)
    with pytest.raises(ValueError, match="compress_ratios has values"):
        ModelDims.from_config({"compress_ratios": [0, 0, 8] + [4] * 41})


@pytest.fixture(scope="module")
def deepseek_v4_specs() -> list[dict]:
    """Every layer's KV cache specs as DeepSeek-V4's own cache modules register them under
    `--kv-cache-dtype fp8` with its 256-token blocks: the reference for the fit."""
    from vllm.config import CacheConfig, VllmConfig, set_current_vllm_config
    from vllm.models.deepseek_v4.attention import (
        DeepseekV4Attention,
        DeepseekV4IndexerCache,
        _resolve_dsv4_kv_cache_dtype,
    )
    from vllm.models.deepseek_v4.compressor import CompressorStateCache
    from vllm.v1.attention.backends.mla.sparse_swa import DeepseekV4SWACache

    cache = CacheConfig(block_size=256, cache_dtype="fp8")
    config = VllmConfig(cache_config=cache)
    kv_dtype, torch_dtype = _resolve_dsv4_kv_cache_dtype(True, cache.cache_dtype, cache)
    assert cache.cache_dtype == "fp8_ds_mla" and cache.block_size == 256

    def layer(i: int) -> dict:
        r, p, d = FLASH.ratios[i], f"model.layers.{i}.attn", FLASH.head_dim
        modules = {}
        if r == 4:  # the indexer: fp8 K + one fp32 scale per 128, its compressor (head 128)
            ih = FLASH.index_head_dim
            modules[f"{p}.indexer.k_cache"] = DeepseekV4IndexerCache(
                head_dim=ih + ih // 128 * 4, dtype=torch.uint8, prefix=f"{p}.indexer.k_cache",
                cache_config=cache, compress_ratio=r)
            modules[f"{p}.indexer.compressor.state_cache"] = CompressorStateCache(
                state_dim=2 * 2 * ih, dtype=torch.float32, compress_ratio=r,
                prefix=f"{p}.indexer.compressor.state_cache")
        modules[f"{p}.swa_cache"] = DeepseekV4SWACache(
            head_dim=d, window_size=FLASH.sliding_window, dtype=torch_dtype,
            prefix=f"{p}.swa_cache", cache_config=cache)
        specs = {name: m.get_kv_cache_spec(config) for name, m in modules.items()}
        if r > 1:
            attn = SimpleNamespace(compress_ratio=r, kv_cache_dtype=kv_dtype, head_dim=d,
                                   kv_cache_torch_dtype=torch_dtype)
            specs[p] = DeepseekV4Attention.get_kv_cache_spec(attn, config)
            state = CompressorStateCache(state_dim=2 * (2 if r == 4 else 1) * d,
                                         dtype=torch.float32, compress_ratio=r,
                                         prefix=f"{p}.compressor.state_cache")
            specs[f"{p}.compressor.state_cache"] = state.get_kv_cache_spec(config)
        return specs

    with set_current_vllm_config(config):
        return [layer(i) for i in range(FLASH.num_hidden_layers)]


def test_kv_specs_are_deepseek_v4s(deepseek_v4_specs):
    """The specs the fit sizes with are the modules' own, field for field and in order."""
    for i in (0, 2, 3, 42):  # SWA only, ratio 4, ratio 128, the last layer (ratio 4)
        ours = memory.layer_kv_cache_specs(FLASH, i)
        assert list(ours.items()) == list(deepseek_v4_specs[i].items()), f"layer {i}"


def vllm_max_concurrency(dep: Deployment, partition: list[int], pool: int,
                         specs: list[dict]) -> float:
    """What vLLM's engine core reports at startup for `pool` bytes per GPU: the requests of
    max_model_len every stage's blocks hold (get_max_concurrency_for_kv_cache_config)."""
    from vllm.v1.core.kv_cache_utils import get_max_concurrency_for_kv_cache_config

    config, configs = vllm_kv_cache_configs(dep, partition, pool, specs)
    return min(get_max_concurrency_for_kv_cache_config(config, c) for c in configs)


def vllm_kv_cache_configs(dep: Deployment, partition: list[int], pool: int, specs: list[dict]):
    """(the config fields vLLM reads, every stage's KV cache config), as the engine core builds
    them at startup for `pool` bytes per GPU (v1/core/kv_cache_utils.py get_kv_cache_configs)."""
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_utils import get_kv_cache_configs
    from vllm.v1.kv_cache_layout import KVCacheLayout

    ns = SimpleNamespace
    config = ns(
        # `vllm serve` with PP: async scheduling on the V2 model runner, the hybrid manager on.
        scheduler_config=ns(async_scheduling=True, disable_hybrid_kv_cache_manager=False,
                            max_num_batched_tokens=dep.max_num_batched_tokens),
        use_v2_model_runner=True,
        parallel_config=ns(pipeline_parallel_size=dep.pipeline_parallel_size,
                           tensor_parallel_size=1, decode_context_parallel_size=1),
        model_config=ns(max_model_len=dep.max_model_len, original_max_model_len=dep.max_model_len),
        cache_config=ns(get_resolved_kv_cache_layout=lambda: KVCacheLayout.BLHNC,
                        num_gpu_blocks_override=None, prefix_cache_retention_interval=None),
        attention_config=ns(hisparse_config=None),
        speculative_config=None,
        num_prefill_lookahead_tokens=0,
    )
    config.max_concurrent_batches = VllmConfig.max_concurrent_batches.fget(config)
    config.max_in_flight_tokens = VllmConfig.max_in_flight_tokens.fget(config)
    starts = [sum(partition[:i]) for i in range(len(partition))]
    workers = [{name: spec for layer in specs[a:a + n] for name, spec in layer.items()}
               for a, n in zip(starts, partition)]
    return config, get_kv_cache_configs(config, workers, [pool] * len(workers))


@pytest.mark.parametrize("concurrency", [1, 2, 4])
@pytest.mark.parametrize("ctx", list(CONTEXTS.values()), ids=list(CONTEXTS))
def test_vllm_admits_the_planned_concurrency(ctx, concurrency, deepseek_v4_specs):
    """The example cluster's rendered `--kv-cache-memory-bytes`, sized by vLLM's own startup
    code, holds `concurrency` requests of max_model_len on every stage. At PP=10 a request
    reserves about 1 GiB (1.5 on five-layer stages), mostly window caches (see memory.py):
    four of them past 16k no longer fit beside five layers' weights, which the plan says."""
    cluster = load_cluster(EXAMPLE).model_copy(
        update={"context_length": ctx, "concurrency": concurrency})
    p = plan(cluster)
    argv = p.serve_argv()
    pool = int(argv[argv.index("--kv-cache-memory-bytes") + 1])
    assert vllm_max_concurrency(p.deployment, p.partition, pool, deepseek_v4_specs) >= concurrency
    if concurrency == 4 and ctx > 16384:
        assert any("does not fit 24.00 GiB" in m and "per request" in m for m in p.problems)
    else:
        assert p.problems == [], p.problems


def test_lmcache_engine_driven_cannot_take_a_deepseek_v4_stage(deepseek_v4_specs):
    """Why lmcache.validate_topology refuses engine_driven (the only LMCache mode that crosses
    nodes): every stage's KV cache config has several groups, and the pinned LMCache's
    engine-driven transfer registers one. When a newer LMCache lifts that, this fails: the
    refusal can then go."""
    import subprocess

    from vllm_ampere.cluster.lmcache import lmcache_python

    p = plan(load_cluster(EXAMPLE))
    _, configs = vllm_kv_cache_configs(p.deployment, p.partition, p.stages[0].kv_pool, deepseek_v4_specs)
    assert min(len(c.kv_cache_groups) for c in configs) > 1
    code = ("import inspect; from lmcache.v1.multiprocess.transfer_context.worker_transfer import "
            "EngineDrivenTransferContext as E; print(inspect.getsource(E.register))")
    source = subprocess.run([lmcache_python(), "-c", code], capture_output=True, text=True, timeout=300)
    assert source.returncode == 0, source.stderr[-2000:]
    assert "len(engine_group_infos) > 1" in source.stdout
    assert "does not support multiple KV" in source.stdout


def test_layer_bytes_are_the_converted_checkpoints(tmp_path):
    """The sizes the fit check uses are those our converter writes: tiny native -> dsv4_int,
    per layer, embedding and head (the hash table is int64 on disk, int32 in vLLM's layer)."""
    import json
    from collections import Counter

    from safetensors import safe_open

    from vllm_ampere.convert import ConvertOptions, convert, make_tiny

    make_tiny(tmp_path / "native")
    convert(tmp_path / "native", tmp_path / "int", ConvertOptions(progress=False))
    dims = ModelDims.from_config(json.loads((tmp_path / "int" / "config.json").read_text()))
    held = Counter()
    for shard in sorted((tmp_path / "int").glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                part = name.split(".")[1] if name.startswith("layers.") else name.split(".")[0]
                held[part] += t.numel() * (4 if name.endswith("tid2eid") else t.element_size())
    for layer in range(dims.num_hidden_layers):
        assert held[str(layer)] == layer_weight_bytes(dims, layer), f"layer {layer} (ratio {dims.ratios[layer]})"
    assert held["embed"] == embedding_bytes(dims)
    assert sum(held[k] for k in ("head", "norm", "hc_head_fn", "hc_head_base", "hc_head_scale")) == head_bytes(dims)

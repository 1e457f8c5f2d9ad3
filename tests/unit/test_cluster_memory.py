"""Layer partition and per-stage memory fit on DeepSeek-V4-Flash's real dimensions."""

from __future__ import annotations

import pytest
import torch

from vllm_ampere.cluster import memory
from vllm_ampere.cluster.memory import GiB, Deployment, plan_memory
from vllm_ampere.cluster.model import (
    ModelDims,
    embedding_bytes,
    head_bytes,
    int4_linear,
    layer_weight_bytes,
)
from vllm_ampere.cluster.partition import partition_env, partition_layers

FLASH = ModelDims()
CONTEXTS = {"16k": 16384, "64k": 65536, "200k": 204800}


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
        # Six 3.5 GiB layers do not fit a 24 GiB card with anything else: refused, with numbers.
        assert problems and all("GiB" in p for p in problems)
        assert any("does not fit 24.00 GiB" in p and "weights" in p for p in problems)
    else:
        assert problems == [], problems
        assert all(s.free >= s.needs_free for s in stages)
    # The KV pool is the largest stage's need, the same on all stages, and covers every stage.
    assert len({s.kv_pool for s in stages}) == 1
    assert all(s.kv_needed <= s.kv_pool for s in stages)


def test_kv_and_transient_grow_with_the_context():
    pools = []
    for ctx in CONTEXTS.values():
        dep = deployment(10, ctx)
        stages = plan_memory(FLASH, dep, partition_layers(FLASH, dep, 10))
        pools.append((stages[1].kv_full, stages[1].attention_transient))
    assert pools == sorted(pools) and pools[0] < pools[-1]
    # fp8_ds_mla: a ratio-4 layer stores 584 B per 4 tokens plus 132 B of indexer per 4.
    per_token = memory.full_kv_bytes_per_token(FLASH, range(2, 4))
    assert per_token == pytest.approx((37440 + 8640 + 1728) / 256)


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
    assert "KV cache is" in msg and last.kv_needed / last.kv_pool < 0.5
    # The cap `render` uses instead leaves each stage gigabytes free.
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


def test_page_sizes_match_vllm_specs():
    """Our page arithmetic against the pinned vLLM's own KV cache spec classes, built with
    the arguments DeepseekV4 attention, indexer, compressor and SWA cache pass."""
    from vllm.v1.kv_cache_interface import MLAAttentionSpec, SlidingWindowMLASpec

    def mla(head, ratio, content=None):
        return MLAAttentionSpec(block_size=256, num_kv_heads=1, max_tp_shards=1, head_size=head,
                                dtype=torch.uint8, tokens_per_state=ratio, alignment=576,
                                cache_dtype_str="fp8_ds_mla", model_version="deepseek_v4",
                                state_content_bytes=content)

    for r in (4, 128):
        assert mla(512, r, 584).page_size_bytes == memory.compressed_page_bytes(r)
    assert mla(132, 4).page_size_bytes == memory.indexer_page_bytes()
    swa = SlidingWindowMLASpec(block_size=64, num_kv_heads=1, max_tp_shards=1, head_size=512,
                               dtype=torch.uint8, sliding_window=128, state_content_bytes=584,
                               alignment=576, cache_dtype_str="fp8_ds_mla",
                               model_version="deepseek_v4")
    assert swa.page_size_bytes == memory.common_page_bytes()
    state = SlidingWindowMLASpec(block_size=4, num_kv_heads=1, max_tp_shards=1, head_size=2048,
                                 dtype=torch.float32, sliding_window=8, alignment=576)
    assert state.page_size_bytes <= memory.common_page_bytes()  # padded up to it by vLLM


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

"""The tiny native checkpoint: real names, dtypes and structure; deterministic; BF16 twin."""

from __future__ import annotations

import json

import pytest
import torch

from vllm_ampere.convert.codecs import decode_fp8_blocks, decode_mxfp4
from vllm_ampere.convert.layout import native_tensors
from vllm_ampere.convert.safetensors_io import ShardReader
from vllm_ampere.convert.source import load_source
from vllm_ampere.convert.tiny import make_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny") / "native", seed=0)


def test_structure_matches_layout(tiny):
    src = load_source(tiny)  # full validation passes
    cfg = src.config
    assert cfg["compress_ratios"][: cfg["num_hidden_layers"]] == [0, 4, 128, 0]
    names = set(src.weight_map)
    assert names == set(native_tensors(cfg))
    assert "layers.1.attn.indexer.wq_b.weight" in names and "layers.2.attn.indexer.wq_b.weight" not in names
    assert "layers.2.attn.compressor.ape" in names and "layers.0.attn.compressor.ape" not in names
    assert "layers.0.ffn.gate.tid2eid" in names and "layers.2.ffn.gate.bias" in names
    assert "mtp.0.e_proj.weight" in names and "mtp.0.ffn.experts.7.w2.scale" in names
    assert len(src.shards) == 5
    r = src.readers[src.weight_map["layers.1.ffn.experts.0.w1.weight"]]
    assert r.tensors["layers.1.ffn.experts.0.w1.weight"].dtype == "I8"
    assert r.tensors["layers.1.ffn.experts.0.w1.scale"].dtype == "F8_E8M0"
    assert r.tensors["layers.1.attn.wq_b.weight"].dtype == "F8_E4M3"
    assert (tiny / "tokenizer.json").exists() and json.loads((tiny / "tokenizer_config.json").read_text())["eos_token"]


def test_deterministic(tiny, tmp_path):
    again = make_tiny(tmp_path / "again", seed=0)
    for f in sorted(p.name for p in tiny.iterdir()):
        assert (tiny / f).read_bytes() == (again / f).read_bytes(), f


def test_bf16_twin_is_the_exact_dequantization(tiny, tmp_path):
    twin = make_tiny(tmp_path / "bf16", seed=0, dtype="bf16")
    cfg = json.loads((twin / "config.json").read_text())
    assert "quantization_config" not in cfg
    index = json.loads((twin / "model.safetensors.index.json").read_text())["weight_map"]
    native_index = json.loads((tiny / "model.safetensors.index.json").read_text())["weight_map"]
    assert not any(n.endswith(".scale") for n in index)
    for name in ("layers.1.attn.wq_b.weight", "layers.2.ffn.experts.3.w2.weight", "mtp.0.h_proj.weight"):
        nat = ShardReader(tiny / native_index[name])
        scale = nat.read_bytes(name[: -len("weight")] + "scale").reshape(nat.tensors[name[: -len("weight")] + "scale"].shape)
        w = nat.read(name)
        want = decode_mxfp4(w.view(torch.uint8), scale) if w.dtype == torch.int8 else decode_fp8_blocks(w, scale)
        got = ShardReader(twin / index[name]).read(name)
        assert got.dtype == torch.bfloat16 and torch.equal(got.float(), want)
        assert 0.005 < want.std() < 0.05  # N(0, 0.02) before quantization

"""dsv4_int end to end through vLLM's loader on CPU: tiny native -> our converter -> vLLM's
DeepSeek-V4 model under a real VllmConfig -> each quantized layer checked against the
dequantized checkpoint; then every load error case, naming its tensor.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import vllm_ampere
from vllm_ampere.bench.processes import free_port
from vllm_ampere.convert import ConvertOptions, convert, make_tiny
from vllm_ampere.quant.loading import Dsv4IntLoadError


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("dsv4")
    make_tiny(root / "native")
    convert(root / "native", root / "int", ConvertOptions(progress=False))
    return root / "int"


@pytest.fixture(scope="module")
def converted_block(converted, tmp_path_factory):
    """The same native checkpoint converted with `--dense-int8 block` (I8, 128x128 scales)."""
    out = tmp_path_factory.mktemp("dsv4_block") / "int"
    convert(converted.parent / "native", out, ConvertOptions(progress=False, dense_int8="block"))
    return out


def spec_int8(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """SPEC section 2 written out here, apart from the runtime's decoders: `channel` is the byte
    minus 128 times its row's scale; `block` is q times its 128x128 block's scale."""
    w = weight.to(torch.float64)
    if weight.dtype == torch.uint8:
        return ((w - 128) * scale.to(torch.float64)[:, None]).float()
    rows, cols = torch.arange(w.shape[0]) // 128, torch.arange(w.shape[1]) // 128
    return (w * scale.to(torch.float64)[rows][:, cols]).float()


def spec_int4(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """INT4 experts: byte j holds element 2j in its low nibble and 2j+1 in its high one, each
    q + 8; one scale per 32 elements along K."""
    u = weight.view(torch.uint8).to(torch.int64)
    q = torch.empty(*u.shape[:-1], 2 * u.shape[-1], dtype=torch.float64)
    q[..., 0::2], q[..., 1::2] = u % 16 - 8, u // 16 - 8
    return (q * scale.to(torch.float64).repeat_interleave(32, dim=-1)).float()


@pytest.fixture(scope="module")
def vllm_env():
    """vLLM's distributed state for one CPU process (what a worker sets up)."""
    vllm_ampere.register()
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import (cleanup_dist_env_and_memory, init_distributed_environment,
                                  initialize_model_parallel)

    port = free_port()
    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(world_size=1, rank=0, local_rank=0,
                                     distributed_init_method=f"tcp://127.0.0.1:{port}", backend="gloo")
        initialize_model_parallel(1, 1)
    yield
    cleanup_dist_env_and_memory()


def _cuda_event_stub(monkeypatch):
    # The shared DeepseekV4Attention.__init__ builds torch.cuda.Event()s, which a CPU torch
    # refuses; the CPU serve path (issue 5) handles that. Here only construction needs it.
    class Event:
        def __init__(self, *args, **kwargs):
            pass

    monkeypatch.setattr(torch.cuda, "Event", Event)


def load(path, monkeypatch):
    """Build vLLM's model for `path` and load it with vLLM's own loader and post-processing."""
    from vllm.config import set_current_vllm_config
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.model_executor.model_loader.utils import initialize_model, process_weights_after_loading
    from vllm.utils.torch_utils import set_default_torch_dtype

    _cuda_event_stub(monkeypatch)
    vc = EngineArgs(model=str(path), dtype="bfloat16", enforce_eager=True, max_model_len=256,
                    max_num_seqs=4).create_engine_config()
    # The steps of vLLM's BaseModelLoader.load_model (its final empty_cache needs an accelerator).
    with set_current_vllm_config(vc), set_default_torch_dtype(vc.model_config.dtype):
        model = initialize_model(vllm_config=vc)
        loader = get_model_loader(vc.load_config)
        loader.load_weights(model, vc.model_config)
        process_weights_after_loading(model, vc.model_config, torch.device("cpu"))
    return vc, model


def _tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("checkpoint", ["converted", "converted_block"])
def test_converted_checkpoint_loads_and_matches_dequantized(checkpoint, request, vllm_env, monkeypatch):
    from vllm_ampere.quant.linear_w8a16 import Dsv4Int8LinearMethod
    from vllm_ampere.quant.moe_w4a16 import Dsv4Int4MoEMethod

    converted = request.getfixturevalue(checkpoint)
    vc, model = load(converted, monkeypatch)
    assert type(vc.quant_config).__name__ == "Dsv4IntConfig"
    ckpt = _tensors(converted)
    cfg = json.loads((converted / "config.json").read_text())
    torch.manual_seed(0)

    linears = {n: m for n, m in model.named_modules() if isinstance(getattr(m, "quant_method", None), Dsv4Int8LinearMethod)}
    experts = {n: m for n, m in model.named_modules() if isinstance(getattr(m, "quant_method", None), Dsv4Int4MoEMethod)}
    n_layers = cfg["num_hidden_layers"]  # the CPU model drops mtp.* (no MTP module on CPU)
    assert len(experts) == n_layers
    # fused_wqa_wkv, wq_b, wo_a, wo_b, shared gate_up and down per layer; indexer.wq_b on ratio-4 layers
    assert len(linears) == 6 * n_layers + sum(1 for r in cfg["compress_ratios"][:n_layers] if r == 4)

    # Every INT8 checkpoint tensor reached a dsv4_int layer and every layer got all it expected.
    for m in list(linears.values()) + list(experts.values()):
        assert m.dsv4_tracker.loaded == set(m.dsv4_tracker.expected)
    covered = {name for m in list(linears.values()) + list(experts.values()) for name in m.dsv4_tracker.expected.values()}
    quantized = {n for n, t in ckpt.items() if t.dtype in (torch.uint8, torch.int8) and not n.startswith("mtp.")}
    quantized |= {n[: -len("weight")] + "scale" for n in quantized}
    assert covered == quantized

    for name, layer in linears.items():
        ck = name.removeprefix("model.")
        parts = {"fused_wqa_wkv": ("wq_a", "wkv"), "gate_up_proj": ("w1", "w3")}.get(ck.rsplit(".", 1)[1])
        sources = [ck.rsplit(".", 1)[0] + "." + p for p in parts] if parts else [ck.replace("down_proj", "w2")]
        w = torch.cat([spec_int8(ckpt[s + ".weight"], ckpt[s + ".scale"]) for s in sources])
        x = torch.randn(5, w.shape[1]).to(torch.bfloat16)
        if getattr(layer, "is_bmm", False):
            # wo_a on CPU: the stock attention took its BF16 snapshot and freed the weight
            # (test_wo_a_cpu_snapshot...); its grouped product: test_grouped_wo_a_...
            assert layer.weight.numel() == 0, name
            continue
        got = layer.quant_method.apply(layer, x).float()
        want = x.float() @ w.T
        torch.testing.assert_close(got, want, atol=2e-2 * want.abs().max().item(), rtol=2e-2, msg=name)

    for name, layer in experts.items():
        ck = layer.layer_name.removeprefix("model.")
        e = cfg["n_routed_experts"]
        deq = {s: torch.stack([spec_int4(ckpt[f"{ck}.{i}.{s}.weight"], ckpt[f"{ck}.{i}.{s}.scale"])
                               for i in range(e)]) for s in ("w1", "w2", "w3")}
        x = torch.randn(7, cfg["hidden_size"]).to(torch.bfloat16)
        ids = torch.stack([torch.randperm(e)[:2] for _ in range(7)]).to(torch.int32)
        wts = torch.rand(7, 2)
        got = layer.quant_method.apply(layer, x, wts, ids).float()
        want = torch.zeros(7, cfg["hidden_size"])
        for t in range(7):
            for k in range(2):
                i = int(ids[t, k])
                gate, up = deq["w1"][i] @ x[t].float(), deq["w3"][i] @ x[t].float()
                limit = cfg["swiglu_limit"]  # DeepSeek-V4's clamped SwiGLU
                h = torch.nn.functional.silu(gate.clamp(max=limit)) * up.clamp(-limit, limit)
                want[t] += wts[t, k] * (deq["w2"][i] @ h)
        torch.testing.assert_close(got, want, atol=3e-2 * want.abs().max().item(), rtol=3e-2, msg=name)


def test_wo_a_cpu_snapshot_is_the_dequantized_weight(converted, vllm_env, monkeypatch):
    """The stock CPU attention snapshots wo_a for bmm_cpu through the patched dequantization."""
    from vllm.models.deepseek_v4.cpu import cpu_sparse

    patched = cpu_sparse._dequant_linear_weight
    assert getattr(patched, "__vllm_ampere_patch__", None) == "dsv4_int_cpu_wo_a_dequant"
    seen = {}

    def spy(layer):
        seen[layer.prefix] = out = patched(layer)
        return out

    monkeypatch.setattr(cpu_sparse, "_dequant_linear_weight", spy)
    load(converted, monkeypatch)
    ckpt = _tensors(converted)
    assert len(seen) == json.loads((converted / "config.json").read_text())["num_hidden_layers"]
    for prefix, got in seen.items():
        ck = prefix.removeprefix("model.")
        want = spec_int8(ckpt[ck + ".weight"], ckpt[ck + ".scale"])
        torch.testing.assert_close(got.float(), want, rtol=0, atol=0, msg=prefix)


def test_grouped_wo_a_is_each_group_of_rows_on_its_slice(converted, vllm_env):
    """wo_a as DeepSeek-V4 builds it (ColumnParallelLinear, is_bmm, one group per o_group),
    loaded through its parameters' loaders: apply_grouped applies group g's rows to x[:, g]."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.linear import ColumnParallelLinear

    from vllm_ampere.quant.config import Dsv4IntConfig

    cfg = json.loads((converted / "config.json").read_text())
    ckpt = _tensors(converted)
    weight, scale = ckpt["layers.0.attn.wo_a.weight"], ckpt["layers.0.attn.wo_a.scale"]
    groups, (n, k) = cfg["o_groups"], weight.shape
    with set_current_vllm_config(VllmConfig()):
        wo_a = ColumnParallelLinear(k, n, bias=False, quant_config=Dsv4IntConfig.from_config(cfg["quantization_config"]),
                                    prefix="model.layers.0.attn.wo_a", params_dtype=torch.bfloat16)
    wo_a.is_bmm, wo_a.bmm_batch_size = True, groups  # as DeepseekV4Attention sets them
    wo_a.weight.weight_loader(wo_a.weight, weight)
    wo_a.weight_scale_inv.weight_loader(wo_a.weight_scale_inv, scale)
    wo_a.quant_method.process_weights_after_loading(wo_a)
    x = torch.randn(3, groups, k, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    got = wo_a.quant_method.apply_grouped(wo_a, x).float()
    want = torch.einsum("tgk,grk->tgr", x.float(), spec_int8(weight, scale).view(groups, n // groups, k))
    torch.testing.assert_close(got, want, atol=2e-2 * want.abs().max().item(), rtol=2e-2)
    with pytest.raises(RuntimeError, match="grouped"):
        wo_a.quant_method.apply(wo_a, x[:, 0])


def _edit(src, dst, change):
    """Copy checkpoint `src` to `dst` with `change(tensors)` applied to its tensors."""
    shutil.copytree(src, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    tensors = {}
    for f in files:
        tensors.update(load_file(dst / f))
        (dst / f).unlink()
    change(tensors)
    save_file(tensors, dst / "model.safetensors")
    index["weight_map"] = {n: "model.safetensors" for n in tensors}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


@pytest.mark.parametrize("change, message", [
    (lambda t: t.pop("layers.1.attn.wkv.scale"), r"missing 1 checkpoint tensor\(s\): layers\.1\.attn\.wkv\.scale"),
    (lambda t: t.pop("layers.2.ffn.experts.5.w3.weight"), r"layers\.2\.ffn\.experts\.5\.w3\.weight"),
    (lambda t: t.__setitem__("layers.0.attn.wq_b.weight", t["layers.0.attn.wq_b.weight"][:-16]),
     r"layers\.0\.attn\.wq_b\.weight: expected uint8 \[4096, 256\]"),
    (lambda t: t.__setitem__("layers.0.attn.wo_b.weight", t["layers.0.attn.wo_b.weight"].view(torch.int8)),
     r"layers\.0\.attn\.wo_b\.weight: expected uint8"),
    (lambda t: t.__setitem__("layers.3.ffn.experts.0.w2.scale", t["layers.3.ffn.experts.0.w2.scale"].float()),
     r"layers\.3\.ffn\.experts\.0\.w2\.scale: expected bfloat16"),
    (lambda t: t.__setitem__("layers.1.ffn.shared_experts.w2.weight", t["layers.1.ffn.shared_experts.w2.weight"][:, :128].contiguous()),
     r"layers\.1\.ffn\.shared_experts\.w2\.weight: expected uint8 \[256, 256\] .*got uint8 \[256, 128\]"),
])
def test_bad_checkpoint_names_the_tensor(converted, vllm_env, monkeypatch, tmp_path, change, message):
    bad = _edit(converted, tmp_path / "bad", change)
    with pytest.raises(Dsv4IntLoadError, match=message):
        load(bad, monkeypatch)


@pytest.mark.parametrize("name, tensor, message", [
    ("layers.0.attn.wq_b.zero_point", torch.zeros(4, dtype=torch.uint8),
     r"unexpected checkpoint tensor layers\.0\.attn\.wq_b\.zero_point \(in model\.safetensors\): "
     r"the DeepSeek-V4 model has no parameter"),
    ("lm_adapter.weight", torch.zeros(4), r"unexpected checkpoint tensor lm_adapter\.weight \(in model\.safetensors\): "
     r"There is no module or parameter named 'lm_adapter' in DeepseekV4ForCausalLM$"),
])
def test_unexpected_tensor_is_named(converted, vllm_env, monkeypatch, tmp_path, name, tensor, message):
    bad = _edit(converted, tmp_path / "extra", lambda t: t.__setitem__(name, tensor))
    with pytest.raises(Dsv4IntLoadError, match=message):
        load(bad, monkeypatch)


@pytest.mark.parametrize("name, dtype, param", [
    # the compressor's fused wkv+wgate (built with quant_config=None) and a norm (default loader)
    ("layers.1.attn.compressor.wkv.weight", torch.uint8,
     r"model\.layers\.1\.attn\.compressor\.fused_wkv_wgate\.weight"),
    ("layers.0.attn_norm.weight", torch.int8, r"model\.layers\.0\.attn_norm\.weight"),
])
def test_quantized_bytes_for_an_unquantized_layer_are_refused(converted, vllm_env, monkeypatch, tmp_path, name,
                                                               dtype, param):
    bad = _edit(converted, tmp_path / "bytes", lambda t: t.__setitem__(name, torch.ones_like(t[name], dtype=dtype)))
    with pytest.raises(Dsv4IntLoadError, match=re.escape(name) + r" \(in model\.safetensors\): holds "
                       + str(dtype).removeprefix("torch.") + r" .* but " + param + r" is unquantized bfloat16"):
        load(bad, monkeypatch)


def test_wrongly_shaped_unquantized_tensor_is_named(converted, vllm_env, monkeypatch, tmp_path):
    name = "layers.0.ffn.gate.weight"
    bad = _edit(converted, tmp_path / "gate", lambda t: t.__setitem__(name, t[name][:4].contiguous()))
    with pytest.raises(Dsv4IntLoadError, match=r"layers\.0\.ffn\.gate\.weight \(in model\.safetensors\): "
                       r"bfloat16 \[4, 256\] does not fit model\.layers\.0\.ffn\.gate\.weight \[8, 256\]"):
        load(bad, monkeypatch)


@pytest.mark.parametrize("name, param", [
    ("layers.0.attn_norm.weight", "model.layers.0.attn_norm.weight"),
    ("layers.1.attn.attn_sink", "model.layers.1.attn.attn_sink"),
    ("layers.0.ffn.gate.tid2eid", "model.layers.0.ffn.gate.tid2eid"),  # int32 hash routing table
    ("embed.weight", "model.embed_tokens.weight"),
])
def test_missing_unquantized_tensor_is_refused(converted, vllm_env, monkeypatch, tmp_path, name, param):
    """Stock vLLM skips its not-loaded check for quantized models: the parameter would keep
    uninitialized memory and the model would serve garbage."""
    bad = _edit(converted, tmp_path / "missing", lambda t: t.pop(name))
    with pytest.raises(Dsv4IntLoadError, match=re.escape(str(bad)) + r" has no tensor for 1 parameter\(s\) of the "
                       r"DeepSeek-V4 model, which would keep uninitialized memory: " + re.escape(param) + "$"):
        load(bad, monkeypatch)


def _to_block(t):
    """Re-shape every INT8 linear tensor as strategy `block` would (I8 weight, 128x128 scales)."""
    for name in [n for n, w in t.items() if w.dtype == torch.uint8]:
        n, k = t[name].shape
        t[name] = (t[name].to(torch.int16) - 128).to(torch.int8)
        scale = name[: -len("weight")] + "scale"
        t[scale] = t[scale][: -(-n // 128)].repeat_interleave(-(-k // 128)).view(-(-n // 128), -(-k // 128))


def test_strategy_and_tensors_disagree(converted, vllm_env, monkeypatch, tmp_path):
    said_block = tmp_path / "said_block"
    shutil.copytree(converted, said_block)
    _set_strategy(said_block, "block")
    with pytest.raises(Dsv4IntLoadError, match=r"layers\.\d+\.\S+\.(weight|scale): expected .*it is a 'channel' "
                       r"tensor, but config\.json's quantization_config says strategy 'block'"):
        load(said_block, monkeypatch)

    said_channel = _edit(converted, tmp_path / "said_channel", _to_block)
    with pytest.raises(Dsv4IntLoadError, match=r"layers\.\d+\.\S+\.(weight|scale): expected .*it is a 'block' "
                       r"tensor, but config\.json's quantization_config says strategy 'channel'.*model\.safetensors"):
        load(said_channel, monkeypatch)
    # The same tensors under a config that says `block` load (a real `block` conversion's values:
    # test_converted_checkpoint_loads_and_matches_dequantized[converted_block]).
    _set_strategy(said_channel, "block")
    load(said_channel, monkeypatch)


def _set_strategy(path, strategy):
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["linears_w8a16"]["weights"]["strategy"] = strategy
    (path / "config.json").write_text(json.dumps(cfg))


class _Config:
    def __init__(self, quantization_config):
        self.quantization_config = quantization_config
        self._name_or_path = "no/such/dir"


def _fake_model(quant_method):
    """A module with one plain parameter and one carrying its own loader, and a stock-like
    load_weights that looks parameters up by name (KeyError when there is none)."""
    from vllm.model_executor.model_loader.weight_utils import default_weight_loader

    model = torch.nn.Module()
    model.config = _Config({"quant_method": quant_method})
    model.norm = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16), requires_grad=False)
    model.gate = torch.nn.Parameter(torch.zeros(2, 4, dtype=torch.bfloat16), requires_grad=False)
    model.gate.weight_loader = default_weight_loader

    def load_weights(self, weights):
        params = dict(self.named_parameters())
        for name, tensor in weights:
            param = params[name]
            getattr(param, "weight_loader", default_weight_loader)(param, tensor)
        return set(params)

    return model, load_weights


def test_guard_is_stock_for_other_models_and_restores_loaders():
    from vllm_ampere.quant.load_guard import guarded_load_weights

    model, load_weights = _fake_model("fp8")
    with pytest.raises(KeyError):
        guarded_load_weights(load_weights, model, [("extra", torch.zeros(1))])
    guarded_load_weights(load_weights, model, [("norm", torch.full((4,), 3, dtype=torch.uint8))])
    assert model.norm.tolist() == [3.0] * 4  # the stock cast, untouched for non-dsv4_int models

    model, load_weights = _fake_model("dsv4_int")
    gate_loader = model.gate.weight_loader
    loaded = guarded_load_weights(load_weights, model, [("norm", torch.ones(4, dtype=torch.bfloat16))])
    assert loaded == {"norm", "gate"}
    with pytest.raises(Dsv4IntLoadError, match=r"tensor gate: holds int8 \[2, 4\] but gate is unquantized"):
        guarded_load_weights(load_weights, model,
                             [("norm", torch.ones(4)), ("gate", torch.ones(2, 4, dtype=torch.int8))])
    with pytest.raises(Dsv4IntLoadError, match=r"unexpected checkpoint tensor extra: .*looked up 'extra'"):
        guarded_load_weights(load_weights, model, [("extra", torch.zeros(1))])
    # Each parameter's own loader (or its absence) is back after every load, failed or not.
    assert model.gate.weight_loader is gate_loader and not hasattr(model.norm, "weight_loader")

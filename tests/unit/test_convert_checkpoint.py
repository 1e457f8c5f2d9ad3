"""The converter end to end on the tiny checkpoint: format, accuracy, bad inputs, resume."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vllm_ampere.convert import safetensors_io
from vllm_ampere.convert.codecs import decode_fp8_blocks, decode_mxfp4
from vllm_ampere.convert.converter import MANIFEST, ConvertOptions, convert
from vllm_ampere.convert.errors import ConversionError
from vllm_ampere.convert.safetensors_io import ShardReader
from vllm_ampere.convert.tiny import make_tiny
from vllm_ampere.quant.schema import IMMA_FLAG, QuantizationConfig

QUIET = ConvertOptions(progress=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny") / "native", seed=0)


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory):
    dst = tmp_path_factory.mktemp("conv") / "out"
    convert(tiny, dst, QUIET)
    return dst


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _tensor(root: Path, name: str) -> torch.Tensor:
    index = json.loads((root / "model.safetensors.index.json").read_text())["weight_map"]
    return ShardReader(root / index[name]).read(name)


def test_format_and_config(tiny, converted):
    cfg = json.loads((converted / "config.json").read_text())
    assert cfg["expert_dtype"] == "int4"
    q = QuantizationConfig.parse(cfg["quantization_config"])
    assert q.scale_mode == "mse" and q.dense_strategy == "channel" and q.imma is None
    assert q.conversion["divisors"][0] == 5.0 and len(q.conversion["divisors"]) == 19
    assert IMMA_FLAG not in cfg["quantization_config"]
    w = _tensor(converted, "layers.1.ffn.experts.2.w1.weight")
    s = _tensor(converted, "layers.1.ffn.experts.2.w1.scale")
    assert w.dtype == torch.int8 and w.shape == (256, 128) and s.dtype == torch.bfloat16 and s.shape == (256, 8)
    assert _tensor(converted, "layers.1.attn.wo_a.weight").dtype == torch.uint8
    assert _tensor(converted, "layers.1.attn.wo_a.scale").shape == (512,)
    assert torch.equal(_tensor(converted, "embed.weight"), _tensor(tiny, "embed.weight"))
    assert (converted / "tokenizer.json").read_bytes() == (tiny / "tokenizer.json").read_bytes()
    rep = json.loads((converted / "dsv4_int_quality.json").read_text())
    assert rep["classes"]["ffn.experts.w1"]["gain_over_absmax7_db"] > 0
    from safetensors import safe_open  # a stock reader loads our shards

    with safe_open(str(converted / "model-00002-of-00005.safetensors"), "pt") as f:
        assert f.get_tensor("layers.1.attn.wq_a.weight").dtype == torch.uint8


def test_dequantized_within_the_arithmetic_bound(tiny, converted):
    for name in ("layers.2.ffn.experts.5.w2.weight", "mtp.0.ffn.experts.0.w3.weight"):
        native_w = _tensor(tiny, name).view(torch.uint8)
        native_s = _tensor(tiny, name[:-6] + "scale").view(torch.uint8)
        g = decode_mxfp4(native_w, native_s)
        packed = _tensor(converted, name).view(torch.uint8)
        q = torch.stack((packed & 0xF, packed >> 4), -1).flatten(-2).float() - 8
        s = _tensor(converted, name[:-6] + "scale").float().repeat_interleave(32, 1)
        err = (q * s - g).abs()
        clamped = (g < -8.5 * s) | (g > 7.5 * s)
        assert bool((err[~clamped] <= s[~clamped] * (0.5 + 2.0**-20)).all())
        assert bool((err[clamped] <= (g.abs() - q.abs() * s)[clamped] * (1 + 2.0**-20)).all())
    for name in ("layers.1.attn.wq_b.weight", "layers.3.ffn.shared_experts.w2.weight"):
        w = decode_fp8_blocks(_tensor(tiny, name), _tensor(tiny, name[:-6] + "scale").view(torch.uint8))
        q = _tensor(converted, name).long() - 128
        s = _tensor(converted, name[:-6] + "scale").float().unsqueeze(1)
        err = (q * s - w).abs()
        assert bool((err <= s * (0.5 + 2.0**-20) + (w.abs() - 127 * s).clamp_min(0)).all())


def test_options_workers_block_imma(tiny, converted, tmp_path):
    two = tmp_path / "two"
    convert(tiny, two, ConvertOptions(progress=False, workers=2))
    assert _files(two) == _files(converted)  # parallel shards, same bytes
    blk = tmp_path / "blk"
    convert(tiny, blk, ConvertOptions(progress=False, dense_int8="block", scale_mode="absmax7", enable_imma=True))
    cfg = json.loads((blk / "config.json").read_text())
    assert cfg["quantization_config"][IMMA_FLAG] is True
    assert _tensor(blk, "layers.1.attn.wo_a.weight").dtype == torch.int8
    assert _tensor(blk, "layers.1.attn.wo_a.scale").shape == (4, 8)


def test_a_shard_holds_one_quantized_tensor_at_a_time(tiny, converted, tmp_path, monkeypatch):
    """Each quantized weight is released once it and its scale are written: holding them all
    grew a real 3.6 GB layer shard's RSS to 4.1 GiB (benchmarks/bench_convert_shard.py)."""
    import weakref

    from vllm_ampere.convert import converter

    quantize, alive, most = converter._quantize, [], [0]

    def tracked(*args):
        most[0] = max(most[0], sum(ref() is not None for ref in alive))
        weight, scale, stat = quantize(*args)
        alive.append(weakref.ref(weight))
        return weight, scale, stat

    monkeypatch.setattr(converter, "_quantize", tracked)
    out = tmp_path / "out"
    convert(tiny, out, QUIET)
    # The last pair written may still be bound to the loop's locals when the next is quantized.
    assert len(alive) > 100 and most[0] <= 1, f"{most[0]} earlier results alive at a quantize call"
    assert _files(out) == _files(converted)


def _copy(tiny: Path, tmp_path: Path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(tiny, src)
    return src


def _rewrite_header(path: Path, edit) -> None:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (n - len(new)) if len(new) <= n else b""
    assert len(new) == n, "edit must not grow the header"
    path.write_bytes(raw[:8] + new + raw[8 + n :])


SHARD2 = "model-00002-of-00005.safetensors"


def _bad_unknown(src):
    _rewrite_header(src / SHARD2, lambda h: h.__setitem__("layers.1.attn.wq_c.weight", h.pop("layers.1.attn.wq_a.weight")))
    idx = json.loads((src / "model.safetensors.index.json").read_text())
    idx["weight_map"]["layers.1.attn.wq_c.weight"] = idx["weight_map"].pop("layers.1.attn.wq_a.weight")
    (src / "model.safetensors.index.json").write_text(json.dumps(idx))


def _bad_missing_scale(src):
    _rewrite_header(src / SHARD2, lambda h: h.pop("layers.1.ffn.experts.3.w2.scale"))
    idx = json.loads((src / "model.safetensors.index.json").read_text())
    del idx["weight_map"]["layers.1.ffn.experts.3.w2.scale"]
    (src / "model.safetensors.index.json").write_text(json.dumps(idx))


def _bad_shape(src):
    cfg = json.loads((src / "config.json").read_text())
    cfg["moe_intermediate_size"] = 512
    (src / "config.json").write_text(json.dumps(cfg))


def _bad_e8m0(src):
    info = ShardReader(src / SHARD2).tensors["layers.1.ffn.experts.4.w1.scale"]
    with open(src / SHARD2, "r+b") as f:
        f.seek(info.start + 37)
        f.write(b"\xff")


def _bad_e4m3_nan(src):
    info = ShardReader(src / SHARD2).tensors["layers.1.attn.wq_b.weight"]
    with open(src / SHARD2, "r+b") as f:
        f.seek(info.start + 300)
        f.write(b"\xff")


def _bad_truncated(src):
    with open(src / SHARD2, "r+b") as f:
        f.truncate(os.path.getsize(src / SHARD2) - 1000)


def _bad_garbled(src):
    raw = bytearray((src / SHARD2).read_bytes())
    raw[20:40] = b"\x00garbage\x01" * 2 + b"\x00\x00"
    (src / SHARD2).write_bytes(bytes(raw))


def _bad_model(src):
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["DeepseekV3ForCausalLM"], "deepseek_v3"
    (src / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "corrupt, message, file, tensor",
    [
        (_bad_unknown, "unknown tensor", SHARD2, "layers.1.attn.wq_c.weight"),
        (_bad_missing_scale, "missing scale", SHARD2, "layers.1.ffn.experts.3.w2.scale"),
        (_bad_shape, "does not match config.json", "model-00001-of-00005.safetensors", "layers.0.ffn.experts.0.w1.scale"),
        (_bad_e8m0, "byte 255", SHARD2, "layers.1.ffn.experts.4.w1.scale"),
        (_bad_e4m3_nan, "e4m3 NaN byte 0xFF", SHARD2, "layers.1.attn.wq_b.weight"),
        (_bad_truncated, "truncated", SHARD2, None),
        (_bad_garbled, "not JSON", SHARD2, None),
        (_bad_model, "not a DeepSeek-V4", "config.json", None),
    ],
)
def test_bad_input_is_named_and_nothing_written(tiny, tmp_path, corrupt, message, file, tensor):
    src = _copy(tiny, tmp_path)
    corrupt(src)
    dst = tmp_path / "dst"
    with pytest.raises(ConversionError, match=message) as e:
        convert(src, dst, QUIET)
    assert e.value.file == file
    if tensor:
        assert e.value.tensor == tensor and tensor in str(e.value)
    assert not dst.exists()


def test_dst_refusals(tiny, converted, tmp_path):
    with pytest.raises(ConversionError, match="not empty"):
        convert(tiny, converted, QUIET)
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text("x")
    with pytest.raises(ConversionError, match="not a conversion output"):
        convert(tiny, other, ConvertOptions(progress=False, resume=True))
    with pytest.raises(ConversionError, match="other options"):
        convert(tiny, converted, ConvertOptions(progress=False, resume=True, scale_mode="absmax8"))
    convert(tiny, other, ConvertOptions(progress=False, overwrite=True))
    assert _files(other) == _files(converted)


def test_disk_full_gives_a_clear_error_and_no_config(tiny, converted, tmp_path, monkeypatch):
    real = safetensors_io.write_all
    calls = {"n": 0}

    def flaky(f, data):
        calls["n"] += 1
        if calls["n"] == 40:  # part-way through a shard
            raise OSError(errno.ENOSPC, "No space left on device")
        real(f, data)

    monkeypatch.setattr(safetensors_io, "write_all", flaky)
    dst = tmp_path / "full"
    with pytest.raises(ConversionError, match="disk full"):
        convert(tiny, dst, QUIET)
    assert not (dst / "config.json").exists()
    assert not list(dst.glob("*.partial"))
    monkeypatch.setattr(safetensors_io, "write_all", real)
    convert(tiny, dst, ConvertOptions(progress=False, resume=True))
    assert _files(dst) == _files(converted)


def test_disk_full_on_a_buffered_write(tmp_path):
    # A real ENOSPC from the kernel: the shard's temporary file is /dev/full. The bytes the writer
    # buffered fail when flushed at the end, and again when the failed shard is closed.
    path = tmp_path / "shard.safetensors"
    (tmp_path / "shard.safetensors.partial").symlink_to("/dev/full")
    writer = safetensors_io.ShardWriter(path, {"t": ("U8", (100,))})
    writer.write("t", torch.zeros(100, dtype=torch.uint8))
    with pytest.raises(ConversionError, match="disk full") as e:
        writer.finish()
    assert e.value.file == path.name
    assert not list(tmp_path.iterdir())


SHARD1 = "model-00001-of-00005.safetensors"


def test_a_failed_shard_keeps_what_other_workers_wrote(tiny, converted, tmp_path):
    src = _copy(tiny, tmp_path)
    reader = ShardReader(src / SHARD1)  # one FP8 block scaled past fp32: found while decoding
    with open(src / SHARD1, "r+b") as f:
        f.seek(reader.tensors["layers.0.attn.wq_a.scale"].start)
        f.write(b"\xfe")  # 2^127
        f.seek(reader.tensors["layers.0.attn.wq_a.weight"].start)
        f.write(b"\x7e")  # e4m3 448
    dst = tmp_path / "dst"
    with pytest.raises(ConversionError, match="non-finite") as e:
        convert(src, dst, ConvertOptions(progress=False, workers=2))
    assert e.value.tensor == "layers.0.attn.wq_a.weight"
    written = sorted(p.name for p in dst.glob("*.safetensors"))
    kept = sorted(json.loads((dst / MANIFEST).read_text())["shards"])
    assert SHARD1 not in written and written == kept  # no finished shard is thrown away
    shutil.copy(tiny / SHARD1, src / SHARD1)
    r = convert(src, dst, ConvertOptions(progress=False, resume=True))
    assert r.skipped == kept and SHARD1 in r.converted
    assert {f: b for f, b in _files(dst).items() if f != MANIFEST} == {f: b for f, b in _files(converted).items() if f != MANIFEST}


def test_resume_redoes_shards_whose_source_changed(tiny, tmp_path):
    src = _copy(tiny, tmp_path)
    dst = tmp_path / "dst"
    convert(src, dst, QUIET)
    before = _files(dst)
    other = make_tiny(tmp_path / "other", seed=1)  # same index and headers, other values
    shutil.copy(other / SHARD2, src / SHARD2)
    r = convert(src, dst, ConvertOptions(progress=False, resume=True))
    assert r.converted == [SHARD2] and len(r.skipped) == 4
    assert _files(dst)[SHARD2] != before[SHARD2]
    assert _tensor(dst, "layers.1.attn.wq_b.weight").equal(_tensor(convert(other, tmp_path / "ref", QUIET).dst, "layers.1.attn.wq_b.weight"))


def test_int32_hash_table_is_kept_as_int32(tiny, converted, tmp_path):
    src = _copy(tiny, tmp_path)
    name = "layers.0.ffn.gate.tid2eid"
    reader = ShardReader(src / SHARD1)
    tensors = {n: reader.read(n) for n in reader.tensors}
    tensors[name] = tensors[name].to(torch.int32)
    writer = safetensors_io.ShardWriter(src / SHARD1, {n: (safetensors_io.dtype_code(t.dtype), tuple(t.shape)) for n, t in tensors.items()})
    for n in writer.order:
        writer.write(n, tensors[n])
    writer.finish()
    dst = tmp_path / "dst"
    convert(src, dst, QUIET)
    assert _tensor(dst, name).dtype == torch.int32 and _tensor(dst, name).equal(_tensor(converted, name).to(torch.int32))
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    data = sum(info.nbytes for f in set(index["weight_map"].values()) for info in ShardReader(dst / f).tensors.values())
    assert index["metadata"]["total_size"] == data


_CHILD = """
import os, signal, sys
from vllm_ampere.convert import safetensors_io
from vllm_ampere.convert.converter import ConvertOptions, convert
target, nth = sys.argv[4], int(sys.argv[5])
real, seen = safetensors_io.write_all, [0]

def write(f, data):  # SIGKILL ourselves at the nth write into the file named `target` (0: never)
    seen[0] += os.path.basename(f.name).startswith(target)
    if nth and seen[0] == nth:
        os.kill(os.getpid(), signal.SIGKILL)
    real(f, data)

safetensors_io.write_all = write
convert(sys.argv[1], sys.argv[2], ConvertOptions(progress=False, resume=sys.argv[3] == "1"))
"""


def test_kill_9_then_resume_is_byte_identical(tiny, converted, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    dst = tmp_path / "killed"
    # Killed part-way through shard 2, then (resumed) part-way through shard 4, then (resumed)
    # as config.json, the completion mark, is being written; each time the shards before stay.
    for target, nth, done in ((SHARD2, 40, 1), ("model-00004", 30, 3), ("config.json", 1, 5)):
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(tiny), str(dst), "1" if dst.exists() else "0",
                               target, str(nth)], env=env)
        assert proc.returncode == -signal.SIGKILL
        assert len(json.loads((dst / MANIFEST).read_text())["shards"]) == done
        assert not (dst / "config.json").exists()
    subprocess.run([sys.executable, "-c", _CHILD, str(tiny), str(dst), "1", "-", "0"], env=env, check=True)
    assert _files(dst) == _files(converted)


_LARGE_PARENT = """
import subprocess, sys
big = bytearray(2 * 2**30)
big[::4096] = b"x" * len(big[::4096])  # resident, not just reserved
del big
code = "import sys; from vllm_ampere.convert.converter import ConvertOptions, convert; " \\
       "print(convert(sys.argv[1], sys.argv[2], ConvertOptions(progress=False)).peak_rss_bytes)"
sys.exit(subprocess.run([sys.executable, "-c", code, *sys.argv[1:]]).returncode)
"""


def test_peak_rss_is_the_converters_own(tiny, tmp_path):
    # Started by a process that once held 2 GiB: getrusage's maxrss would report that parent's peak.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", _LARGE_PARENT, str(tiny), str(tmp_path / "out")], env=env,
                         check=True, capture_output=True, text=True).stdout
    peak = int(out.split()[-1])
    assert 50 * 2**20 < peak < 2**30, peak

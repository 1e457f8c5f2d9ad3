"""W8A16 on CPU: the repacked layout, the reference math, dispatch and errors."""

import dataclasses

import pytest
import torch

from vllm_ampere.cluster.model import ModelDims
from vllm_ampere.convert.layout import native_tensors, tensor_class
from vllm_ampere.ops import w8a16
from vllm_ampere.ops.w8a16 import DSV4_FLASH_SHAPES

ODD_SHAPES = {"one tile": (16, 16), "K not a multiple of 32": (48, 80), "N not a multiple of 64": (80, 4112)}
ALL_SHAPES = {**DSV4_FLASH_SHAPES, **ODD_SHAPES}


def test_flash_shapes_are_the_checkpoints_int8_gemms():
    """The shapes the tests and the benchmark use are those of every INT8 weight of a Flash
    checkpoint (the converter's layout at the published dims), merged as vLLM runs them."""
    dims = ModelDims()
    cfg = dataclasses.asdict(dims) | {"num_nextn_predict_layers": 1}
    shapes = {tensor_class(t.name): t.shape for t in native_tensors(cfg).values() if t.kind == "fp8"}
    fused = {
        "attn.fused_wqa_wkv": ("attn.wq_a", "attn.wkv"),
        "ffn.shared_experts.gate_up": ("ffn.shared_experts.w1", "ffn.shared_experts.w3"),
    }
    gemms = {}
    for merged, parts in fused.items():
        (n0, k), (n1, k1) = (shapes.pop(p) for p in parts)
        assert k == k1  # merged along N
        gemms[merged] = (n0 + n1, k)
    n, k = shapes.pop("attn.wo_a")
    gemms["attn.wo_a"] = (n // dims.o_groups, k)  # one GEMM per output group
    gemms.update(shapes)
    assert set(gemms.values()) == set(DSV4_FLASH_SHAPES.values())
    assert len(set(DSV4_FLASH_SHAPES.values())) == len(DSV4_FLASH_SHAPES)  # each measured once


def random_weight(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Checkpoint bytes are q + 128 with q in [-127, 127]; 0 never occurs, 255 does.
    w = torch.randint(1, 256, (n, k), generator=g, dtype=torch.uint8)
    scale = (torch.rand(n, generator=g) * 1e-2 + 1e-4).to(torch.bfloat16)
    return w, scale


@pytest.mark.parametrize("name", list(ALL_SHAPES))
def test_repack_roundtrip_and_padding(name):
    n, k = ALL_SHAPES[name]
    w, scale = random_weight(n, k)
    packed = w8a16.repack(w, scale)
    kp = -(-k // 32) * 32
    assert packed.qweight.shape == (n // 16, kp // 32, 512) and packed.qweight.dtype == torch.uint8
    assert packed.locks.shape == (-(-n // 64),) and not packed.locks.any()
    assert torch.equal(w8a16.unpack_reference(packed.qweight, k), w)
    if kp > k:  # the padded tail holds q = 0
        assert (w8a16.unpack_reference(packed.qweight, kp)[:, k:] == 128).all()


def test_repack_layout_matches_documented_lane_order():
    n, k = 32, 64
    w, _ = random_weight(n, k, seed=1)
    q = w8a16.repack_reference(w)
    for s in range(n // 16):
        for kt in range(k // 32):
            for lane in range(32):
                g, t = divmod(lane, 4)
                chunk = q[s, kt, 16 * lane : 16 * lane + 16]
                cols = slice(32 * kt + 8 * t, 32 * kt + 8 * t + 8)
                assert torch.equal(chunk[:8], w[16 * s + g, cols])
                assert torch.equal(chunk[8:], w[16 * s + g + 8, cols])


def mma_emulated_tile(chunk_bytes, act):
    """One warp's two m16n8k16 steps on a packed 16x32 tile, built lane by lane the way the
    kernel fills its registers (dequant_tile, FragB) and placed where the PTX ISA fragment
    layouts say each register sits. act: [8 tokens, 32 k]. Returns [16 rows, 8 tokens]."""
    d = torch.zeros(16, 8, dtype=torch.float64)
    for step in range(2):
        a_mat = torch.zeros(16, 16, dtype=torch.float64)
        b_mat = torch.zeros(16, 8, dtype=torch.float64)
        for lane in range(32):
            g, t = divmod(lane, 4)
            c = chunk_bytes[16 * lane : 16 * lane + 16].double() - 128
            row_g, row_g8 = c[4 * step : 4 * step + 4], c[8 + 4 * step : 8 + 4 * step + 4]
            x = act[g, 8 * t + 4 * step : 8 * t + 4 * step + 4]
            a_mat[g, 2 * t : 2 * t + 2] = row_g[:2]  # a[0]: row g, k 2t..2t+1
            a_mat[g + 8, 2 * t : 2 * t + 2] = row_g8[:2]  # a[1]: row g+8
            a_mat[g, 2 * t + 8 : 2 * t + 10] = row_g[2:]  # a[2]: row g, k 2t+8..
            a_mat[g + 8, 2 * t + 8 : 2 * t + 10] = row_g8[2:]  # a[3]
            b_mat[2 * t : 2 * t + 2, g] = x[:2]  # b[0]: k 2t..2t+1, token g
            b_mat[2 * t + 8 : 2 * t + 10, g] = x[2:]  # b[1]: k 2t+8..
        d += a_mat @ b_mat
    return d


def test_fragment_permutation_computes_the_tile_product():
    w, _ = random_weight(16, 32, seed=2)
    act = torch.randn(8, 32, dtype=torch.float64)
    chunk = w8a16.repack_reference(w)[0, 0]
    expected = (w.double() - 128) @ act.T
    torch.testing.assert_close(mma_emulated_tile(chunk, act), expected, rtol=0, atol=1e-9)


def byte_perm(x, y, sel):
    """CUDA __byte_perm: byte i of the result is byte (sel >> 4i) & 7 of y:x."""
    src = x | (y << 32)
    return sum(((src >> (8 * ((sel >> (4 * i)) & 7))) & 0xFF) << (8 * i) for i in range(4))


def test_dequant_bit_tricks_are_exact_for_every_byte():
    import numpy as np

    for b in range(256):
        word = b * 0x01010101
        # bf16: 0x4B000000 | b is 2^23 + b; minus 2^23 + 128 leaves b - 128 with 16 zero low bits.
        for i, sel in enumerate((0x7440, 0x7441, 0x7442, 0x7443)):
            assert byte_perm(word, 0x4B000000, sel) == 0x4B000000 | b, (b, i)
        f = np.array([0x4B000000 | b], dtype=np.uint32).view(np.float32)[0] - np.float32(8388736.0)
        bits = int(np.array([f], dtype=np.float32).view(np.uint32)[0])
        assert f == b - 128 and bits & 0xFFFF == 0
        hi = 0x12340000
        assert byte_perm(bits, hi, 0x7632) == (bits >> 16) | (hi & 0xFFFF0000)
        # fp16: 0x6400 | b is 1024 + b; minus 1152 (0x6480) is b - 128, exact in half precision.
        pair = byte_perm(word, 0x64646464, 0x5140)
        assert pair == (0x6400 | b) | ((0x6400 | b) << 16)
        assert byte_perm(word, 0x64646464, 0x5342) == pair
        h = np.array([pair & 0xFFFF], dtype=np.uint16).view(np.float16)[0]
        assert np.array([0x6480], dtype=np.uint16).view(np.float16)[0] == 1152
        assert h - np.float16(1152) == b - 128


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(ALL_SHAPES))
def test_gemm_reference_matches_float64(name, dtype):
    n, k = ALL_SHAPES[name]
    w, scale = random_weight(n, k, seed=3)
    a = torch.randn(3, k, generator=torch.Generator().manual_seed(4)).to(dtype)
    packed = w8a16.repack(w, scale)
    ref64 = (a.double() @ ((w.double() - 128) * scale.double()[:, None]).T)
    out = w8a16.gemm(a, packed, scale)  # CPU tensors dispatch to the reference
    assert out.dtype == dtype and out.shape == (3, n)
    assert torch.equal(out, w8a16.gemm_reference(a, packed, scale))
    err = (out.double() - ref64).norm() / ref64.norm()
    assert err < 4e-3, f"{name}: relative error {err:.2e}"


def test_gemm_handles_zero_rows():
    w, scale = random_weight(16, 32)
    out = w8a16.gemm(torch.empty(0, 32, dtype=torch.bfloat16), w8a16.repack(w, scale), scale)
    assert out.shape == (0, 16)


@pytest.mark.parametrize(
    "weight, scale, message",
    [
        (torch.zeros(16, 32, dtype=torch.int8), torch.ones(16, dtype=torch.bfloat16), "uint8"),
        (torch.zeros(24, 32, dtype=torch.uint8), torch.ones(24, dtype=torch.bfloat16), "multiples of 16"),
        (torch.zeros(16, 40, dtype=torch.uint8), torch.ones(16, dtype=torch.bfloat16), "multiples of 16"),
        (torch.zeros(16, 32, dtype=torch.uint8), torch.ones(16, dtype=torch.float32), "scale"),
        (torch.zeros(16, 32, dtype=torch.uint8), torch.ones(32, dtype=torch.bfloat16), "scale"),
    ],
)
def test_repack_rejects_bad_inputs(weight, scale, message):
    with pytest.raises(ValueError, match=message):
        w8a16.repack(weight, scale)


def test_gemm_rejects_bad_inputs():
    w, scale = random_weight(32, 64)
    packed = w8a16.repack(w, scale)
    with pytest.raises(ValueError, match="bfloat16|float16"):
        w8a16.gemm(torch.zeros(2, 64), packed, scale)
    with pytest.raises(ValueError, match="packed for K = 64"):
        w8a16.gemm(torch.zeros(2, 96, dtype=torch.bfloat16), packed, scale)
    with pytest.raises(ValueError, match="a has K = 48; the weight was packed for K = 64"):
        w8a16.gemm(torch.zeros(2, 48, dtype=torch.bfloat16), packed, scale)  # same two k-tiles of 32
    with pytest.raises(ValueError, match="scale"):
        w8a16.gemm(torch.zeros(2, 64, dtype=torch.bfloat16), packed, scale[:16])

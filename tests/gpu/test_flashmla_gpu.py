"""The sm80 sparse-MLA kernels against the fp32 torch reference, on a CUDA GPU (sm_80+).

Run: PYTHONPATH=overlay python -m pytest tests/gpu/test_flashmla_gpu.py  (after building
vllm_ampere._flashmla_C). GPUs newer than sm_89 run the compute_80 PTX (backend="cuda" forces
the kernel path there). Shapes are DeepSeek-V4-Flash's: 64 heads, head dim 512, sliding window
128 (SWA cache blocks of 64 tokens), top-k 512 over the C4A cache (blocks of 64 compressed
tokens) or all C128A entries (blocks of 2).
"""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from vllm_ampere.attention.reference import sparse_mla as ref
from vllm_ampere.ops import flashmla

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU", allow_module_level=True)
if torch.cuda.get_device_capability() < (8, 0):
    pytest.skip("needs compute capability >= 8.0", allow_module_level=True)
if not flashmla.extension_available():
    pytest.skip("vllm_ampere._flashmla_C is not built", allow_module_level=True)

DEV = "cuda"
H, D = 64, 512
TOL = dict(elem=2e-2, rel=8e-3, cos=0.99995)


def assert_close(out, want, what, lse=None, lse_want=None):
    """abs / rel / cosine tolerances, matching inf positions, worst element named."""
    assert out.shape == want.shape, what
    out, want = out.float(), want.float()
    assert torch.isfinite(out).all(), f"{what}: {(~torch.isfinite(out)).sum().item()} non-finite outputs"
    diff = (out - want).abs()
    scale = want.abs().max().clamp_min(1e-6)
    worst = torch.unravel_index(diff.argmax(), diff.shape)
    where = f"{what}: worst at {tuple(int(i) for i in worst)} out={out[worst].item():.6g} ref={want[worst].item():.6g}"
    if want.norm() > 0:
        rel = ((out - want).norm() / want.norm()).item()
        cos = torch.nn.functional.cosine_similarity(out.flatten(), want.flatten(), dim=0).item()
        assert rel < TOL["rel"], f"{where}; relative error {rel:.3e}"
        assert cos > TOL["cos"], f"{where}; cosine {cos:.7f}"
    assert (diff <= TOL["elem"] * scale).all(), f"{where}; |err| {diff.max().item():.3e} vs max|ref| {scale.item():.3e}"
    if lse is not None:
        assert torch.equal(torch.isinf(lse), torch.isinf(lse_want)), f"{what}: inf positions of lse differ"
        fin = torch.isfinite(lse_want)
        torch.testing.assert_close(lse[fin], lse_want[fin], atol=2e-3, rtol=1e-4, msg=lambda m: f"{what} lse: {m}")


def paged_cache(num_blocks, block_size, gen, pad=576):
    stride = block_size * ref.TOKEN_BYTES + pad
    cache = torch.zeros(num_blocks * stride, dtype=torch.uint8, device=DEV).as_strided(
        (num_blocks, block_size, ref.TOKEN_BYTES), (stride, ref.TOKEN_DATA_BYTES, 1))
    kv = (torch.randn(num_blocks * block_size, D, generator=gen, device=DEV) * 1.5).to(torch.bfloat16)
    ref.insert_fp8_ds_mla(cache, block_size, torch.arange(num_blocks * block_size, device=DEV), kv)
    return cache


def decode_case(b, gen, extra_width=512, extra_block=64, extra_blocks=64):
    win = paged_cache(16, 64, gen)
    cmp = paged_cache(extra_blocks, extra_block, gen)
    q = torch.randn(b, 1, H, D, generator=gen, device=DEV).to(torch.bfloat16)
    win_idx = torch.randint(0, 16 * 64, (b, 1, 128), generator=gen, device=DEV, dtype=torch.int32)
    cmp_idx = torch.randint(0, extra_blocks * extra_block, (b, 1, extra_width), generator=gen, device=DEV, dtype=torch.int32)
    win_len = torch.randint(1, 129, (b,), generator=gen, device=DEV, dtype=torch.int32)
    cmp_len = torch.randint(0, extra_width + 1, (b,), generator=gen, device=DEV, dtype=torch.int32)
    sink = torch.randn(H, generator=gen, device=DEV)
    return dict(q=q, k_cache=win.unsqueeze(-2), indices=win_idx, topk_length=win_len, attn_sink=sink,
                extra_k_cache=cmp.unsqueeze(-2), extra_indices_in_kvcache=cmp_idx, extra_topk_length=cmp_len)


def run_decode(case, backend, scale=D ** -0.5):
    return flashmla.flash_mla_with_kvcache(
        case["q"], case["k_cache"], None, None, 512, None, softmax_scale=scale, is_fp8_kvcache=True,
        indices=case["indices"], attn_sink=case["attn_sink"], extra_k_cache=case["extra_k_cache"],
        extra_indices_in_kvcache=case["extra_indices_in_kvcache"], topk_length=case["topk_length"],
        extra_topk_length=case["extra_topk_length"], backend=backend)


@pytest.mark.parametrize("b", [1, 2, 3, 4, 5, 6])
def test_decode_c4a_shapes(b):
    case = decode_case(b, torch.Generator(device=DEV).manual_seed(b))
    out, lse = run_decode(case, "cuda")
    want, lse_want = run_decode(case, "torch")
    assert_close(out, want, f"decode b={b}", lse, lse_want)


def test_decode_c128a_wide_stream():
    """C128A: the compressed stream is every entry so far (2048 wide at 256k context, blocks of 2)."""
    case = decode_case(4, torch.Generator(device=DEV).manual_seed(11), extra_width=2048, extra_block=2, extra_blocks=1500)
    out, lse = run_decode(case, "cuda")
    want, lse_want = run_decode(case, "torch")
    assert_close(out, want, "decode c128a", lse, lse_want)


def test_decode_edge_cases():
    gen = torch.Generator(device=DEV).manual_seed(5)
    case = decode_case(6, gen)
    idx, cmp = case["indices"], case["extra_indices_in_kvcache"]
    idx[0] = -1  # query 0: window all invalid ...
    case["extra_topk_length"][0] = 0  # ... and no compressed entries: empty query
    idx[1, 0, :64] = 1 << 30  # out of range
    cmp[1, 0, 100:] = -5
    idx[2, 0, :] = idx[2, 0, 0]  # duplicates
    case["topk_length"][2] = 128
    case["attn_sink"][:16] = 0.0  # zero sink
    case["attn_sink"][16:32] = float("-inf")  # no sink effect
    case["attn_sink"][32:40] = float("inf")  # output forced to 0
    out, lse = run_decode(case, "cuda")
    want, lse_want = run_decode(case, "torch")
    assert_close(out, want, "decode edge cases", lse, lse_want)
    assert (out[0] == 0).all() and torch.isposinf(lse[0]).all()
    assert (out[:, :, 32:40] == 0).all()


def test_decode_is_independent_of_batch():
    case = decode_case(6, torch.Generator(device=DEV).manual_seed(7))
    out_all, lse_all = run_decode(case, "cuda")
    one = {k: (v[3:4] if k in ("q", "indices", "topk_length", "extra_indices_in_kvcache", "extra_topk_length") else v)
           for k, v in case.items()}
    out_one, lse_one = run_decode(one, "cuda")
    assert torch.equal(out_all[3:4], out_one) and torch.equal(lse_all[3:4], lse_one)


def test_decode_cache_past_2_pow_31_bytes():
    gen = torch.Generator(device=DEV).manual_seed(8)
    block_size, stride = 64, 64 * ref.TOKEN_BYTES + 576
    num_blocks = (1 << 31) // stride + 64  # ~2.2 GB
    cache = torch.zeros(num_blocks * stride, dtype=torch.uint8, device=DEV).as_strided(
        (num_blocks, block_size, ref.TOKEN_BYTES), (stride, ref.TOKEN_DATA_BYTES, 1))
    last = num_blocks * block_size
    slots = torch.arange(last - 640, last, device=DEV)
    ref.insert_fp8_ds_mla(cache, block_size, slots, torch.randn(640, D, generator=gen, device=DEV).to(torch.bfloat16))
    q = torch.randn(2, 1, H, D, generator=gen, device=DEV).to(torch.bfloat16)
    idx = slots[torch.randint(0, 640, (2, 1, 640), generator=gen, device=DEV)].to(torch.int32)
    idx[1, 0, -8:] = last  # one past the end
    case = dict(q=q, k_cache=cache.unsqueeze(-2), indices=idx, topk_length=None, attn_sink=None,
                extra_k_cache=None, extra_indices_in_kvcache=None, extra_topk_length=None)
    out, lse = run_decode(case, "cuda")
    want, lse_want = run_decode(case, "torch")
    assert_close(out, want, "decode >2 GiB cache", lse, lse_want)


def prefill_case(s_q, gen, width=640):
    s_kv = 4096 + s_q // 4  # gathered compressed + window rows of a prefill chunk
    q = torch.randn(s_q, H, D, generator=gen, device=DEV).to(torch.bfloat16)
    kv = torch.randn(s_kv, 1, D, generator=gen, device=DEV).to(torch.bfloat16)
    idx = torch.randint(-1, s_kv, (s_q, 1, width), generator=gen, device=DEV, dtype=torch.int32)
    idx[::7, 0, -64:] = s_kv + 3  # out of range
    lens = torch.randint(0, width + 1, (s_q,), generator=gen, device=DEV, dtype=torch.int32)
    sink = torch.randn(H, generator=gen, device=DEV)
    return q, kv, idx, lens, sink


@pytest.mark.parametrize("s_q", [1024, 8192, 65536])
def test_prefill_shapes(s_q):
    q, kv, idx, lens, sink = prefill_case(s_q, torch.Generator(device=DEV).manual_seed(s_q))
    scale = D ** -0.5
    out, mx, lse = flashmla.flash_mla_sparse_fwd(q, kv, idx, scale, attn_sink=sink, topk_length=lens, backend="cuda")
    rows = torch.arange(0, s_q, max(1, s_q // 2048), device=DEV)  # the reference on a sample of rows
    o_w, mx_w, lse_w = flashmla.flash_mla_sparse_fwd(q[rows], kv, idx[rows], scale, attn_sink=sink,
                                                     topk_length=lens[rows], backend="torch")
    assert_close(out[rows], o_w, f"prefill s_q={s_q}", lse[rows], lse_w)
    fin = torch.isfinite(mx_w)
    assert torch.equal(torch.isinf(mx[rows]), ~fin)
    torch.testing.assert_close(mx[rows][fin], mx_w[fin], atol=2e-3, rtol=1e-4)


SANITIZER_SCRIPT = textwrap.dedent("""
    import torch
    from vllm_ampere.attention.reference import sparse_mla as ref
    from vllm_ampere.ops import flashmla
    g = torch.Generator(device="cuda").manual_seed(0)
    cache = torch.zeros(2, 64, 584, dtype=torch.uint8, device="cuda")  # exactly 2 blocks, no slack
    q = torch.randn(2, 1, 64, 512, generator=g, device="cuda").to(torch.bfloat16)
    idx = torch.tensor([[[-1, 128, 129, 1 << 30, -(1 << 30), 127, 0, 5] * 16]], device="cuda", dtype=torch.int32).repeat(2, 1, 1)
    flashmla.flash_mla_with_kvcache(q, cache.unsqueeze(-2), None, None, 512, None, is_fp8_kvcache=True,
                                    indices=idx, extra_k_cache=cache.unsqueeze(-2), extra_indices_in_kvcache=idx,
                                    topk_length=torch.tensor([128, 3], device="cuda", dtype=torch.int32), backend="cuda")
    kv = torch.randn(100, 512, generator=g, device="cuda").to(torch.bfloat16)
    pidx = torch.tensor([[-1, 100, 101, 1 << 30, 99, 0] * 32] * 3, device="cuda", dtype=torch.int32)
    flashmla.flash_mla_sparse_fwd(q[:1, 0].repeat(3, 1, 1), kv, pidx, 0.05, backend="cuda")
    torch.cuda.synchronize()
    print("sanitizer script done")
""")


@pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="compute-sanitizer not on PATH")
def test_out_of_range_indices_under_memcheck(tmp_path):
    script = tmp_path / "oob.py"
    script.write_text(SANITIZER_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run(["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "3",
                             sys.executable, str(script)], capture_output=True, text=True, timeout=900, env=env)
    out = result.stdout + result.stderr
    if "Device not supported" in out:  # e.g. under gVisor, where the tool cannot attach
        pytest.skip("compute-sanitizer cannot attach to this GPU here: " + out.strip().splitlines()[0])
    assert result.returncode == 0 and "sanitizer script done" in out, out[-4000:]
    assert "ERROR SUMMARY: 0 errors" in out, out[-4000:]

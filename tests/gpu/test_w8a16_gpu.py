"""The compiled W8A16 ops against the fp32 reference, on a CUDA GPU (sm_80+).

Run: PYTHONPATH=overlay python -m pytest tests/gpu/test_w8a16_gpu.py   (after building vllm_ampere._C)
GPUs newer than sm_89 run the compute_80 PTX: the tests force the kernel path there.
"""

import pytest
import torch

from vllm_ampere.ops import extension_error, w8a16
from vllm_ampere.ops.w8a16 import DSV4_FLASH_SHAPES

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU", allow_module_level=True)
if torch.cuda.get_device_capability() < (8, 0):
    pytest.skip("needs compute capability >= 8.0", allow_module_level=True)
if extension_error():
    pytest.skip(extension_error(), allow_module_level=True)

MS = (1, 2, 3, 4, 6, 8, 16, 64, 512, 2048)
ODD_SHAPES = {"K not a multiple of 32": (48, 80), "N not a multiple of 64": (80, 4112), "one tile": (16, 16)}
TOL = {torch.bfloat16: dict(rel=6e-3, elem=2e-2, cos=0.99995), torch.float16: dict(rel=1.5e-3, elem=5e-3, cos=0.99999)}
DEV = "cuda"


def make_weight(n, k, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    w = torch.randint(1, 256, (n, k), generator=g, dtype=torch.uint8, device=DEV)
    scale = (torch.rand(n, generator=g, device=DEV) * 1e-2 + 1e-4).to(torch.bfloat16)
    return w, scale


def reference(a, w, scale):
    return (a.float() @ (w.float() - 128).T) * scale.float()


def poisoned_gemm(a, packed, scale, **kw):
    """gemm with NaN left in the memory the output is likely to get (the caching allocator
    hands back the block just freed), so an element the kernel misses shows up as NaN."""
    n = packed.qweight.shape[0] * 16
    torch.full((a.shape[0], n), float("nan"), dtype=a.dtype, device=DEV)
    return w8a16.gemm(a, packed, scale, **kw)


def assert_close(out, ref, dtype, what):
    tol = TOL[dtype]
    assert out.shape == ref.shape and out.dtype == dtype, what
    assert torch.isfinite(out).all(), f"{what}: {(~torch.isfinite(out)).sum().item()} non-finite outputs"
    out, ref = out.float(), ref.float()
    diff = (out - ref).abs()
    scale = ref.abs().max().clamp_min(1e-30)
    worst = int(diff.argmax())
    m, n = divmod(worst, ref.shape[1])
    where = f"{what}: worst at [m={m}, n={n}] out={out[m, n].item():.6g} ref={ref[m, n].item():.6g}"
    rel = ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item()
    assert rel < tol["rel"], f"{where}; relative error {rel:.3e}"
    assert cos > tol["cos"], f"{where}; cosine {cos:.7f}"
    assert (diff <= tol["elem"] * scale).all(), f"{where}; |err| {diff.max().item():.3e} vs max|ref| {scale.item():.3e}"


@pytest.fixture(scope="module", autouse=True)
def force_kernels():
    """Run the sm_80 code on whatever sm_80+ GPU this is (an H200 runs its PTX)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(w8a16.FORCE_ENV, "1")
        yield


@pytest.fixture(scope="module", params=list(DSV4_FLASH_SHAPES) + list(ODD_SHAPES))
def weight(request, force_kernels):
    n, k = {**DSV4_FLASH_SHAPES, **ODD_SHAPES}[request.param]
    w, scale = make_weight(n, k, seed=n + k)
    return request.param, w, scale, w8a16.repack(w, scale)


def test_repack_kernel_matches_reference(weight):
    name, w, scale, packed = weight
    assert torch.equal(packed.qweight, w8a16.repack_reference(w)), name


@pytest.mark.parametrize("m", MS)
def test_gemm_bf16(weight, m):
    name, w, scale, packed = weight
    a = torch.randn(m, w.shape[1], device=DEV, dtype=torch.bfloat16)
    out = poisoned_gemm(a, packed, scale)
    assert_close(out, reference(a, w, scale), torch.bfloat16, f"{name} M={m} bf16")
    assert not packed.locks.any(), "split-K locks not re-armed"


@pytest.mark.parametrize("m", (1, 6, 16, 64, 512))
def test_gemm_fp16(weight, m):
    name, w, scale, packed = weight
    a = torch.randn(m, w.shape[1], device=DEV, dtype=torch.float16)
    out = poisoned_gemm(a, packed, scale)
    assert_close(out, reference(a, w, scale), torch.float16, f"{name} M={m} fp16")


@pytest.mark.parametrize("path", ["fused", "dequant"])
@pytest.mark.parametrize("m", (1, 5, 33, 130))
def test_both_paths_at_any_m(path, m):
    w, scale = make_weight(1536, 4096, seed=7)
    packed = w8a16.repack(w, scale)
    a = torch.randn(m, 4096, device=DEV, dtype=torch.bfloat16)
    assert_close(poisoned_gemm(a, packed, scale, path=path), reference(a, w, scale), torch.bfloat16, f"{path} M={m}")


@pytest.mark.parametrize("split_k", (1, 2, 3, 7, 16, 1000))
@pytest.mark.parametrize("m", (1, 8, 13))
def test_split_k_is_deterministic_and_rearms(split_k, m):
    w, scale = make_weight(1024, 4096, seed=8)
    packed = w8a16.repack(w, scale)
    a = torch.randn(m, 4096, device=DEV, dtype=torch.bfloat16)
    first = poisoned_gemm(a, packed, scale, path="fused", split_k=split_k)
    assert_close(first, reference(a, w, scale), torch.bfloat16, f"split_k={split_k} M={m}")
    assert not packed.locks.any()
    for _ in range(3):
        assert torch.equal(poisoned_gemm(a, packed, scale, path="fused", split_k=split_k), first)


def test_nan_in_a_row_stays_in_that_row():
    w, scale = make_weight(512, 4096, seed=9)
    packed = w8a16.repack(w, scale)
    a = torch.randn(4, 4096, device=DEV, dtype=torch.bfloat16)
    a[2, 100] = float("nan")
    out = w8a16.gemm(a, packed, scale)
    assert torch.equal(torch.isnan(out), torch.isnan(reference(a, w, scale)))
    assert torch.isnan(out[2]).all() and not torch.isnan(out[[0, 1, 3]]).any()


def test_cuda_graph_replay():
    w, scale = make_weight(1536, 4096, seed=10)
    packed = w8a16.repack(w, scale)
    a = torch.randn(4, 4096, device=DEV, dtype=torch.bfloat16)
    w8a16.gemm(a, packed, scale)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = w8a16.gemm(a, packed, scale)
    for _ in range(3):
        a.copy_(torch.randn_like(a))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, reference(a, w, scale), torch.bfloat16, "graph replay")


BAD_INPUTS = {  # name: (a, qweight, scale, locks) from a good call -> a bad one, message
    "non-contiguous a": (lambda a, q, s, l: (a.t().contiguous().t(), q, s, l), "contiguous"),  # a.T's layout
    "misaligned a": (lambda a, q, s, l: (torch.randn(a.numel() + 4, device=DEV, dtype=a.dtype)[4:].view(a.shape), q, s, l), "aligned"),
    "short locks": (lambda a, q, s, l: (a, q, s, l[:0]), "locks"),
    "fp32 scale": (lambda a, q, s, l: (a, q, s.float(), l), "scale"),
    "a on the CPU": (lambda a, q, s, l: (a.cpu(), q, s, l), "CUDA"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_are_refused_at_the_binding(case):
    w, scale = make_weight(64, 128, seed=11)
    packed = w8a16.repack(w, scale)
    a = torch.randn(2, 128, device=DEV, dtype=torch.bfloat16)
    make_bad, message = BAD_INPUTS[case]
    args = make_bad(a, packed.qweight, scale, packed.locks)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.vllm_ampere.w8a16_gemm(*args, 0, 0)


def test_repack_refuses_bad_shape_at_the_binding():
    with pytest.raises(RuntimeError, match="multiples of 16"):
        torch.ops.vllm_ampere.w8a16_repack(torch.zeros(24, 32, dtype=torch.uint8, device=DEV))


@pytest.mark.skipif(torch.cuda.get_device_capability() < (9, 0), reason="only newer GPUs need forcing")
def test_unforced_newer_gpu_gets_a_clear_error(monkeypatch):
    monkeypatch.setenv(w8a16.FORCE_ENV, "0")
    w, scale = make_weight(64, 128, seed=12)
    with pytest.raises(RuntimeError, match=w8a16.FORCE_ENV):
        w8a16.repack(w, scale)

"""patches/mhc_prenorm_gemm_sm8x: the first layer's broadcast pre-mix asks for DeepGEMM, which
has no sm8x kernel; on sm8x the call is rewritten to the TileLang fallback (run on a GPU only)."""

import pytest
import torch

import vllm_ampere.attention.backend as backend
from vllm_ampere.patches import mhc_prenorm_gemm_sm8x

H, HC = 4096, 4  # DeepSeek-V4-Flash hidden size and hyper-connection streams


def _recording():
    calls = []

    def stock(x, fn, *, hidden_size, hc_mult, use_tilelang_fallback=True):
        calls.append(dict(hidden_size=hidden_size, hc_mult=hc_mult, use_tilelang_fallback=use_tilelang_fallback))
        return "out", "sqrsum"

    return stock, calls


@pytest.mark.parametrize("on_ampere", [False, True])
def test_broadcast_pre_on_sm8x_takes_tilelang_as_one_stream(monkeypatch, on_ampere):
    monkeypatch.setattr(backend, "tensor_on_ampere", lambda t: on_ampere)
    stock, calls = _recording()
    routed = mhc_prenorm_gemm_sm8x.PATCH.replace(stock)
    x = torch.zeros(3, H)  # mhc_pre_broadcast_tilelang: the 2-D embedding output
    fn = torch.zeros(HC * (2 + HC), H)  # its fn_broadcast
    assert routed(x, fn, hidden_size=H, hc_mult=HC, use_tilelang_fallback=False) == ("out", "sqrsum")
    if on_ampere:  # TileLang's kernel asserts x.shape[1] == hc_mult * hidden_size
        assert calls == [dict(hidden_size=H, hc_mult=1, use_tilelang_fallback=True)]
    else:
        assert calls == [dict(hidden_size=H, hc_mult=HC, use_tilelang_fallback=False)]


def test_calls_that_allow_the_fallback_are_untouched(monkeypatch):
    monkeypatch.setattr(backend, "tensor_on_ampere", lambda t: True)
    stock, calls = _recording()
    routed = mhc_prenorm_gemm_sm8x.PATCH.replace(stock)
    routed(torch.zeros(3, HC * H), torch.zeros(24, HC * H), hidden_size=H, hc_mult=HC)
    assert calls == [dict(hidden_size=H, hc_mult=HC, use_tilelang_fallback=True)]


def test_the_stock_broadcast_pre_still_demands_deepgemm():
    """Tripwire: when vLLM lets the broadcast pre fall back by itself, drop the patch."""
    import inspect

    from vllm.model_executor.kernels.mhc import tilelang

    source = inspect.getsource(tilelang.mhc_pre_broadcast_tilelang)
    assert "use_tilelang_fallback=False" in source

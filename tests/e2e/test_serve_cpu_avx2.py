"""The tiny dsv4_int DeepSeek-V4 served with vLLM's AVX2 kernel library, whose DeepSeek-V4 ops
are our torch versions (vllm_ampere.cpu.ops), against the same model served with the AVX-512
library's stock kernels.

On an AVX-512 machine a sitecustomize (conftest `force_avx2_env`) makes torch report no AVX-512,
so every server process loads `_C_AVX2` as on an AVX2-only CPU; the test checks the mapped
library in each process. The AVX-512 server runs first (skipped where the CPU lacks AVX-512) and
is stopped before the AVX2 one starts.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import psutil
import pytest
import torch

from test_serve_cpu import SERVE_ARGS, post_json, prompt_logprobs, prompts, served  # noqa: F401 (fixture)


HAS_AVX512 = torch.cpu._is_avx512_supported()
# Prompt log-probabilities (nats), AVX2 (our torch ops) vs AVX-512 (stock kernels). Both compute
# the same model; they differ in rounding only: the stock sparse decode rounds attention
# probabilities to bf16 before P @ V (ours keeps fp32), the stock SWA insert flushes e4m3
# subnormals, and fp32 sums run in another order. Measured on the tiny model: short prompt max
# 0.0098 (mean 0.0028), long prompt (2618 tokens, the indexer's top-512 path) max 0.030 (mean
# 0.0018); the bound leaves 2.7x. A wrong layout, scale or RoPE direction moves log-probabilities
# by their own spread (BF16 per-token std ~0.4).
LOGPROB_TOL = 0.08
GREEDY_TOKENS = 16


def _kernel_libraries(root_pid: int) -> dict[int, set[str]]:
    """vLLM kernel libraries (_C*.abi3.so) mapped by each process of the server's tree."""
    found = {}
    root = psutil.Process(root_pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            maps = Path(f"/proc/{proc.pid}/maps").read_text()
        except (FileNotFoundError, PermissionError):
            continue
        libs = {line.rsplit("/", 1)[-1] for line in maps.splitlines() if "/vllm/_C" in line}
        if libs:
            found[proc.pid] = libs
    return found


def _greedy_with_margins(server, prompt: str) -> list[tuple[str, float, set[str]]]:
    """Greedy tokens, each with its log-probability margin over the runner-up and the top two."""
    out = post_json(f"{server.base_url}/v1/completions", {
        "model": server.model_id(), "prompt": prompt, "max_tokens": GREEDY_TOKENS, "temperature": 0,
        "logprobs": 2})
    lp = out["choices"][0]["logprobs"]
    steps = []
    for token, top in zip(lp["tokens"], lp["top_logprobs"]):
        ranked = sorted(top.values(), reverse=True)
        steps.append((token, ranked[0] - ranked[1] if len(ranked) > 1 else float("inf"), set(top)))
    return steps


def _observe(server, prompts: dict[str, str]) -> dict:
    return {"greedy": _greedy_with_margins(server, prompts["short"]),
            "logprobs": {name: prompt_logprobs(server, p)[0] for name, p in prompts.items()},
            "libraries": _kernel_libraries(server.proc.pid)}


@pytest.fixture(scope="module")
def avx512_run(tiny_checkpoints, prompts, tmp_path_factory):
    if not HAS_AVX512:
        pytest.skip("this CPU has no AVX-512: no stock DeepSeek-V4 kernels to compare with")
    log = tmp_path_factory.mktemp("serve_avx512") / "server.log"
    with served(tiny_checkpoints["dsv4_int"], log, SERVE_ARGS) as server:
        return _observe(server, prompts) | {"log": log.read_text()}


@pytest.fixture(scope="module")
def avx2_run(tiny_checkpoints, prompts, force_avx2_env, avx512_run, tmp_path_factory):
    # Depends on avx512_run so the two servers never run at the same time.
    log = tmp_path_factory.mktemp("serve_avx2") / "server.log"
    with served(tiny_checkpoints["dsv4_int"], log, SERVE_ARGS, force_avx2_env) as server:
        return _observe(server, prompts) | {"log": log.read_text()}


def test_avx2_library_loaded_and_gaps_filled(avx2_run, avx512_run):
    libs = avx2_run["libraries"]
    assert libs, "no process of the server mapped a vLLM kernel library"
    assert all(names == {"_C_AVX2.abi3.so"} for names in libs.values()), libs
    assert all("_C_AVX2.abi3.so" not in names for names in avx512_run["libraries"].values())
    assert "torch versions registered in torch.ops._C: convert_weight_packed, bmm_cpu" in avx2_run["log"]
    assert "torch versions registered" not in avx512_run["log"]


@pytest.mark.parametrize("name", ["short", "long"])
def test_avx2_logprobs_match_avx512(avx2_run, avx512_run, name):
    got, ref = avx2_run["logprobs"][name], avx512_run["logprobs"][name]
    assert len(got) == len(ref)
    diffs = [abs(a - b) for a, b in zip(got, ref)]
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    print(f"{name}: AVX2 vs AVX-512 over {len(diffs)} prompt tokens: max |diff| {diffs[worst]:.4g} at "
          f"token {worst}, mean {statistics.fmean(diffs):.4g}")
    assert diffs[worst] <= LOGPROB_TOL, f"token {worst}: AVX2 {got[worst]} vs AVX-512 {ref[worst]}"


def test_avx2_greedy_matches_avx512_until_a_near_tie(avx2_run, avx512_run):
    """Greedy tokens agree up to the first step whose top-2 margin is within twice the
    log-probability bound, where rounding may legitimately pick the other token (the tiny random
    model has near-ties)."""
    ours, theirs = avx2_run["greedy"], avx512_run["greedy"]
    assert ours and len(ours) == len(theirs) == GREEDY_TOKENS
    for step, ((tok, _, _), (ref_tok, ref_margin, ref_top)) in enumerate(zip(ours, theirs)):
        if ref_margin <= 2 * LOGPROB_TOL:
            print(f"near-tie at step {step} (margin {ref_margin:.4g}); {step} tokens compared")
            assert tok in ref_top, f"step {step}: AVX2 {tok!r} is not among AVX-512's top two {ref_top}"
            break
        assert tok == ref_tok, f"step {step}: AVX2 {tok!r} vs AVX-512 {ref_tok!r} (margin {ref_margin:.4g})"

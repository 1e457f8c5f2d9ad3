"""DeepSeek-V4 end to end on the CPU build: tiny native checkpoint -> our converter -> `vllm serve`.

One BF16 server (the twin, for reference log-probabilities, stopped before the next starts) and
one dsv4_int server for the module. What is shown:
- our plugin is loaded in every vLLM process (API server, engine core, worker) and says which
  patches it installed; our dsv4_int linear and MoE methods are the ones in use;
- /v1/completions returns text, and greedy outputs are identical across two requests;
- a prompt longer than index_topk (512) compressed entries of the ratio-4 layer (> 2048 tokens)
  runs, so the indexer's top-k selection path runs, not only its short-context fill;
- the prompt's token log-probabilities under dsv4_int stay close to BF16's (bounds below);
- the real `vllm bench serve` client completes every request at concurrency 1 and 2.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import CPU_SERVE_ENV

from vllm_ampere.bench.processes import Server

SERVE_ARGS = ["--max-model-len", "4096", "--max-num-seqs", "4"]
INDEX_TOPK, C4_RATIO = 512, 4  # tiny config: index_topk and the indexer layer's compress ratio
WORDS = ("the model serves tokens on ampere gpus with int4 experts and int8 linears; a quick brown "
         "fox jumps over the lazy dog while 12345 numbers, code() and {json: true} appear").split()
SHORT_PROMPT = "DeepSeek V4 Flash compresses attention with ratios 4 and 128, and the quick brown fox"
LONG_PROMPT_TOKENS = C4_RATIO * INDEX_TOPK + 400  # 2448: 612 compressed entries > 512
# dsv4_int vs its BF16 twin on the prompt's token log-probabilities (nats). The twin holds the
# native FP8/MXFP4 weights exactly; dsv4_int re-quantizes them (INT8 per row, INT4 per 32 along
# K), so the difference is that quantization error only. Measured on the tiny model: max 0.045,
# mean 0.012, std 0.015, against a BF16 per-token std of 0.39 (correlation 0.9993); the INT4
# requantization of the MXFP4 experts dominates (~20 dB per group). Bounds: max 0.15 (10x the
# measured noise std, 3x the measured max), mean 0.04, correlation >= 0.99. A wrong scale,
# nibble order or layout moves log-probabilities by the order of their own spread and
# decorrelates them, so it cannot pass.
LOGPROB_TOL, LOGPROB_MEAN_TOL, LOGPROB_MIN_CORR = 0.15, 0.04, 0.99


@contextmanager
def served(model: Path, log_path: Path, serve_args: list[str], extra_env: dict[str, str] | None = None):
    """A running `vllm serve MODEL` (yielded as its Server); stopped by process group on exit."""
    server = Server(model=str(model), serve_args=serve_args, log_path=log_path,
                    env=os.environ | CPU_SERVE_ENV | (extra_env or {}), startup_timeout_s=600)
    server.start(progress=lambda msg: print(msg, flush=True))
    try:
        yield server
    finally:
        server.stop()


def post_json(url: str, body: dict, timeout_s: float = 600) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        raise AssertionError(f"{url} answered {e.code}: {e.read().decode(errors='replace')}") from e


def prompt_logprobs(server, prompt: str) -> tuple[list[float], int]:
    """Log-probabilities of the prompt's own tokens (echo) and the prompt's token count."""
    out = post_json(f"{server.base_url}/v1/completions", {
        "model": server.model_id(), "prompt": prompt, "max_tokens": 1, "temperature": 0,
        "echo": True, "logprobs": 1})
    lps = out["choices"][0]["logprobs"]["token_logprobs"]
    n_prompt = out["usage"]["prompt_tokens"]
    return [float(x) for x in lps[1:n_prompt]], n_prompt


def greedy(server, prompt: str, max_tokens: int = 16) -> dict:
    out = post_json(f"{server.base_url}/v1/completions", {
        "model": server.model_id(), "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "logprobs": 1})
    choice = out["choices"][0]
    return {"text": choice["text"], "tokens": choice["logprobs"]["tokens"],
            "prompt_tokens": out["usage"]["prompt_tokens"]}


@pytest.fixture(scope="module")
def prompts(tiny_checkpoints) -> dict[str, str]:
    """A short prompt and one of at least LONG_PROMPT_TOKENS tokens under the tiny tokenizer."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_checkpoints["bf16"] / "tokenizer.json"))
    words: list[str] = []
    while len(tok.encode(" ".join(words)).ids) < LONG_PROMPT_TOKENS:
        words += [WORDS[(7 * i) % len(WORDS)] for i in range(len(words), len(words) + 50)]
    return {"short": SHORT_PROMPT, "long": " ".join(words)}


@pytest.fixture(scope="module")
def bf16_reference(tiny_checkpoints, prompts, tmp_path_factory) -> dict:
    """Prompt log-probabilities of the BF16 twin, served the same way (server stopped after)."""
    log = tmp_path_factory.mktemp("serve_bf16") / "server.log"
    with served(tiny_checkpoints["bf16"], log, SERVE_ARGS) as server:
        return {name: prompt_logprobs(server, p)[0] for name, p in prompts.items()}


@pytest.fixture(scope="module")
def int_server(tiny_checkpoints, bf16_reference, tmp_path_factory):
    # Depends on bf16_reference so the two servers never run at the same time.
    log = tmp_path_factory.mktemp("serve_dsv4_int") / "server.log"
    with served(tiny_checkpoints["dsv4_int"], log, SERVE_ARGS) as server:
        server.log = log
        yield server


def test_plugin_quant_methods_and_patches_in_use(int_server):
    log = int_server.log.read_text()
    plugin = re.findall(r"\(([\w-]+) pid=\d+\).*vllm_ampere plugin loaded in pid \d+.*?patches installed: (.*)", log)
    roles = {role.split("-")[0] for role, _ in plugin}
    assert {"EngineCore", "VllmWorker"} <= roles, f"plugin lines seen: {plugin}"
    # The API server loads plugins before vLLM configures logging, so its line comes through
    # the plugin's own early logger (vllm_ampere._register._announce), without a role prefix.
    api = re.findall(r"\[vllm_ampere\.announce\] vllm_ampere plugin loaded in pid (\d+)", log)
    assert str(int_server.proc.pid) in api, f"API server (pid {int_server.proc.pid}) lines: {api}"
    worker_patches = " ".join(p for role, p in plugin if role.startswith("VllmWorker"))
    for name in ("cpu_build_tile_scheduler_keys", "cpu_triton_token_request_mapping", "cpu_hash_topk"):
        assert name in worker_patches, f"{name} not installed in the worker: {worker_patches}"
    assert "dsv4_int INT8 linears:" in log and "dsv4_int routed experts:" in log


def test_completion_text_and_greedy_determinism(int_server):
    first, second = greedy(int_server, SHORT_PROMPT), greedy(int_server, SHORT_PROMPT)
    assert first["text"], "empty completion"
    assert first == second


def test_long_prompt_runs_the_indexer_topk_path(int_server, prompts):
    out = greedy(int_server, prompts["long"], max_tokens=4)
    # More compressed entries than index_topk: the ratio-4 layer's indexer must select.
    assert out["prompt_tokens"] // C4_RATIO > INDEX_TOPK, out["prompt_tokens"]
    assert len(out["tokens"]) == 4


@pytest.mark.parametrize("name", ["short", "long"])
def test_logprobs_close_to_bf16(int_server, bf16_reference, prompts, name):
    got, _ = prompt_logprobs(int_server, prompts[name])
    ref = bf16_reference[name]
    assert len(got) == len(ref)
    diffs = [abs(a - b) for a, b in zip(got, ref)]
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    corr = statistics.correlation(got, ref)
    print(f"{name}: {len(diffs)} tokens, max |diff| {diffs[worst]:.4g} at token {worst}, mean "
          f"{statistics.fmean(diffs):.4g}, correlation {corr:.5f}, BF16 std {statistics.pstdev(ref):.3g}")
    assert diffs[worst] <= LOGPROB_TOL, f"token {worst}: dsv4_int {got[worst]} vs BF16 {ref[worst]}"
    assert statistics.fmean(diffs) <= LOGPROB_MEAN_TOL
    assert corr >= LOGPROB_MIN_CORR


@pytest.mark.parametrize("concurrency", [1, 2])
def test_vllm_bench_serve_completes_every_request(int_server, tiny_checkpoints, tmp_path, concurrency):
    num_prompts = 2 * concurrency + 2
    cmd = [str(Path(sys.executable).parent / "vllm"), "bench", "serve", "--backend", "vllm",
           "--base-url", int_server.base_url, "--model", int_server.model_id(),
           "--tokenizer", str(tiny_checkpoints["dsv4_int"]), "--dataset-name", "random",
           "--random-input-len", "256", "--random-output-len", "16", "--ignore-eos",
           "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency),
           "--disable-tqdm", "--save-result", "--result-dir", str(tmp_path),
           "--result-filename", "bench.json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=os.environ)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["completed"] == num_prompts, result
    assert result["total_output_tokens"] == 16 * num_prompts

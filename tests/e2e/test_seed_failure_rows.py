"""The seed's failing rows, 16k C=2 (stalled on the fork) and 32k C=1 (illegal memory access),
with their neighbours 16k C=1 and 32k C=2, through our whole stack on CPU: the tiny dsv4_int
model, a real `vllm serve` with the seed's batching (max_num_seqs 6, max_num_batched_tokens
2048, so a 32k prompt is prefilled in 16 chunks while the other stream decodes), the real
`vllm bench serve`, every row `pass`.

What it shows: the engine paths those rows take (chunked prefill interleaved with a running
decode, the compressors and the indexer's top-k over 8k compressed entries, block tables of a
32k context) work with our patches and quantization. What it cannot show: the fork's failures
were on CUDA with PP=10; those need a GPU cluster (`vllm-ampere bench` there).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import assert_rows_pass, run_bench

MAX_POSITIONS = 65536  # the tiny config's 4096 is only a default; its RoPE works at any length


def long_context_copy(model: Path, dst: Path) -> Path:
    shutil.copytree(model, dst)
    for name, key in (("config.json", "max_position_embeddings"), ("tokenizer_config.json", "model_max_length")):
        cfg = json.loads((dst / name).read_text())
        cfg[key] = MAX_POSITIONS
        (dst / name).write_text(json.dumps(cfg, indent=2))
    return dst


def test_seed_failure_rows_pass(tiny_checkpoints, tmp_path):
    model = long_context_copy(tiny_checkpoints["dsv4_int"], tmp_path / "model")
    out = tmp_path / "bench"
    proc = run_bench(model, out, "--max-model-len 32768 --max-num-seqs 6 --max-num-batched-tokens 2048", "16k,32k",
                     "--stall-timeout", "120", "--min-prefill-tok-s", "100", timeout_s=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((out / "report.json").read_text())["rows"]
    assert_rows_pass(rows, [("16k", 1), ("16k", 2), ("32k", 1), ("32k", 2)])

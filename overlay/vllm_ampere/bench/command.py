"""`vllm-ampere bench`: run the random-prefix matrix against a server and write the report."""

from __future__ import annotations

import argparse
import importlib.metadata
import random
import shlex
import sys
import time
from pathlib import Path

HELP = (
    "run the random-prefix serving matrix with `vllm bench serve` against --base-url or a "
    "`vllm serve --model` started here; write JSON, a Markdown table beside the published rows, plots"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vllm_ampere.bench.matrix import DEFAULT_MATRIX
    from vllm_ampere.bench.runner import WatchConfig

    d = WatchConfig()
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--base-url", help="a running server, e.g. http://127.0.0.1:8080")
    target.add_argument("--model", help="start `vllm serve MODEL` here (stopped at the end)")
    parser.add_argument("--serve-args", default="", help='extra `vllm serve` arguments, one string: "--max-model-len 4096 ..."')
    parser.add_argument("--port", type=int, help="port for the server started here (default: a free one)")
    parser.add_argument("--startup-timeout", type=float, default=900.0, help="seconds for the started server to become healthy")
    parser.add_argument("--tokenizer", help="tokenizer for the client when the served name is not a loadable path")
    parser.add_argument("--bench-args", default="", help="extra `vllm bench serve` arguments, one string")
    parser.add_argument("--seed", type=int, help="dataset seed base (default: a new one per run, so a rerun against "
                        "the same server draws new prompts instead of prefix-cache hits; the report names it)")
    parser.add_argument("--server-log", type=Path, help="with --base-url: the server's log, read for OOM and last lines")
    parser.add_argument("--matrix", type=Path, default=DEFAULT_MATRIX, help="matrix CSV (default: benchmarks/matrix.csv)")
    parser.add_argument("--contexts", help="contexts to run: labels of the matrix, token counts or LABEL=TOKENS, comma-separated")
    parser.add_argument("--concurrency", help="concurrencies to run, comma-separated (default: the matrix's)")
    parser.add_argument("--output-len", type=int, help="output tokens per request (default: the matrix's, 512)")
    parser.add_argument("--out", type=Path, help="result folder (default: bench-results/<date-time>)")
    parser.add_argument("--stall-timeout", type=float, default=d.stall_timeout_s, help="seconds without a new token while requests run before a row is stalled")
    parser.add_argument("--min-prefill-tok-s", type=float, default=d.min_prefill_tok_s, help="slowest prefill rate expected: before the first token a row may take stall-timeout + input*C/this")
    parser.add_argument("--poll", type=float, default=d.poll_s, help="seconds between /metrics scrapes")
    parser.add_argument("--row-timeout", type=float, default=d.row_timeout_s, help="hard limit on one row, in seconds")
    parser.add_argument("--show-published", action="store_true", help="print the published tables and exit")


def _show_published() -> int:
    from vllm_ampere.bench.report import load_published, markdown_table

    published = load_published()
    for variant in dict.fromkeys(p["variant"] for p in published):
        print(f"## published {variant}\n")
        print(markdown_table([p for p in published if p["variant"] == variant]) + "\n")
    return 0


def run(args) -> int:
    if args.show_published:
        return _show_published()
    if not (args.base_url or args.model):
        print("vllm-ampere bench: give --base-url (a running server) or --model (start one)", file=sys.stderr)
        return 2
    from vllm_ampere.bench.matrix import MatrixError, load_matrix, select
    from vllm_ampere.bench.processes import Server
    from vllm_ampere.bench.report import load_published, markdown_table, measured_row, write_report
    from vllm_ampere.bench.runner import WatchConfig, run_matrix, say

    try:
        rows = select(load_matrix(args.matrix), args.contexts, args.concurrency, args.output_len)
    except MatrixError as e:
        print(f"vllm-ampere bench: {e}", file=sys.stderr)
        return 2
    out = args.out or Path("bench-results") / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    watch = WatchConfig(args.stall_timeout, args.min_prefill_tok_s, args.poll, args.row_timeout)
    if args.model:
        server = Server(model=args.model, serve_args=shlex.split(args.serve_args),
                        log_path=out / "server.log", port=args.port,
                        startup_timeout_s=args.startup_timeout)  # fmt: skip
    else:
        server = Server(base_url=args.base_url, log_path=args.server_log)
    seed_base = args.seed if args.seed is not None else random.randrange(2**31)
    meta = {
        "server": server.base_url if not server.owned else f"vllm serve {args.model} {args.serve_args}".strip(),
        "vllm": importlib.metadata.version("vllm"),
        "matrix": " ".join(
            [str(args.matrix)]
            + [f"--{k.replace('_', '-')} {v}" for k, v in
               (("contexts", args.contexts), ("concurrency", args.concurrency), ("output_len", args.output_len)) if v]
            + [f"({len(rows)} rows)"]
        ),  # fmt: skip
        "stall timeout s": args.stall_timeout,
        "dataset seed base": seed_base,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    published = load_published()
    say(f"{len(rows)} row(s): " + ", ".join(f"{r.context} C={r.concurrency} out={r.output_tokens}" for r in rows))
    # The client loads the tokenizer by the served model's name unless told; that name may be
    # a --served-model-name, so point it at the model itself (a running server's from /v1/models).
    tokenizer = args.tokenizer or args.model or server.model_root()
    results = run_matrix(
        rows, server, out, watch, tokenizer, shlex.split(args.bench_args),
        on_row=lambda done: write_report(done, out, meta, published), seed_base=seed_base,
    )  # fmt: skip
    paths = write_report(results, out, meta, published)
    print(markdown_table([measured_row(r) for r in results]))
    say(f"report: {paths['markdown']}, {paths['json']}, plots: {', '.join(paths['plots'])}")
    return 0 if all(r.result == "pass" for r in results) else 1

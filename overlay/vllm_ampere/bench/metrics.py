"""Reading a vLLM server's Prometheus `/metrics`: the few series the stall watchdog needs.

Series names are those of vLLM 0.32.0's PrometheusStatLogger (vllm/v1/metrics/loggers.py);
each carries `engine` and `model_name` labels (and `finished_reason` for request_success), so a
value here is the sum over all label sets: all engines of a data-parallel server together.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from dataclasses import dataclass

RUNNING = "vllm:num_requests_running"  # gauge: requests in model execution batches
WAITING = "vllm:num_requests_waiting"  # gauge: requests queued
GENERATED = "vllm:generation_tokens_total"  # counter: tokens generated since start
FINISHED = "vllm:request_success_total"  # counter by finished_reason (stop/length/abort/error)
SERIES = (RUNNING, WAITING, GENERATED, FINISHED)
# Counters of prompt tokens looked up in / served from vLLM's prefix cache and a KV connector's
# (LMCache): the seed card's rows had 0.0% of both, so a row with hits is not comparable.
PREFIX_CACHE = ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total")
EXTERNAL_PREFIX_CACHE = ("vllm:external_prefix_cache_queries_total", "vllm:external_prefix_cache_hits_total")


def parse_prometheus(text: str, names: tuple[str, ...] = SERIES) -> dict[str, float]:
    """Sum the samples of each metric in `names` over its label sets (text exposition 0.0.4)."""
    wanted = set(names)
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        # `name{labels} value [timestamp]` or `name value [timestamp]`; label values may hold
        # spaces, so split the name at `{` and take the value after the closing brace.
        if "{" in line:
            name, rest = line.split("{", 1)
            rest = rest.rsplit("}", 1)[1]
        else:
            name, _, rest = line.partition(" ")
        if name in wanted:
            fields = rest.split()
            if fields:
                sums[name] = sums.get(name, 0.0) + float(fields[0])
    return sums


@dataclass(frozen=True)
class Sample:
    """One scrape: the time it was taken and the series it found (None where absent)."""

    t: float
    running: float | None = None
    waiting: float | None = None
    generated: float | None = None
    finished: float | None = None
    error: str | None = None  # why the scrape failed; the values are then None

    @property
    def ok(self) -> bool:
        return self.error is None and self.generated is not None

    def as_dict(self) -> dict:
        """The values under their vLLM series names, as a report shows them."""
        values = zip(SERIES, (self.running, self.waiting, self.generated, self.finished))
        return {name: v for name, v in values if v is not None}


def from_text(text: str, t: float) -> Sample:
    values = parse_prometheus(text)
    if GENERATED not in values:
        return Sample(t, error=f"/metrics has no {GENERATED} series")
    return Sample(
        t, values.get(RUNNING), values.get(WAITING), values[GENERATED], values.get(FINISHED)
    )


_SCRAPE_ERRORS = (urllib.error.URLError, OSError, ValueError)


def _metrics_text(base_url: str, timeout_s: float) -> str:
    """GET `{base_url}/metrics` (raises one of _SCRAPE_ERRORS)."""
    with urllib.request.urlopen(f"{base_url.rstrip('/')}/metrics", timeout=timeout_s) as r:
        return r.read().decode("utf-8", "replace")


def cache_counters(base_url: str, timeout_s: float = 5.0) -> dict[str, float]:
    """The prefix-cache counters the server exposes now; empty when the scrape fails."""
    try:
        return parse_prometheus(_metrics_text(base_url, timeout_s), PREFIX_CACHE + EXTERNAL_PREFIX_CACHE)
    except _SCRAPE_ERRORS:
        return {}


def hit_rate(before: dict[str, float], after: dict[str, float], series: tuple[str, str]) -> float | None:
    """Hits / queries between two cache_counters() readings; None where unknown or nothing was queried."""
    queries, hits = series
    if not all(name in d for d in (before, after) for name in series):
        return None
    asked = after[queries] - before[queries]
    return (after[hits] - before[hits]) / asked if asked > 0 else None


def scrape(base_url: str, timeout_s: float = 5.0) -> Sample:
    """GET `{base_url}/metrics`; never raises: a failure comes back as a Sample with `error`."""
    t = time.monotonic()
    try:
        return from_text(_metrics_text(base_url, timeout_s), t)
    except _SCRAPE_ERRORS as e:
        return Sample(t, error=f"{type(e).__name__}: {e}")

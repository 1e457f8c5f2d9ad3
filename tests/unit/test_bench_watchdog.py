"""Reading /metrics and the stall rule, on vLLM 0.32.0's real exposition text."""

from __future__ import annotations

import pytest

from http_stub import serving
from vllm_ampere.bench.metrics import (EXTERNAL_PREFIX_CACHE, GENERATED, PREFIX_CACHE, RUNNING, Sample, cache_counters,
                                       from_text, hit_rate, parse_prometheus, scrape)
from vllm_ampere.bench.processes import free_port
from vllm_ampere.bench.watchdog import StallWatch

# Captured from `vllm serve` (vLLM 0.32.0, CPU build) after two requests; trimmed.
REAL_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny"} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="tiny"} 0.0
vllm:num_requests_waiting_by_reason{engine="0",model_name="tiny",reason="capacity"} 0.0
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="tiny"} 32.0
# HELP vllm:generation_tokens_created Number of generation tokens processed.
# TYPE vllm:generation_tokens_created gauge
vllm:generation_tokens_created{engine="0",model_name="tiny"} 1.764454904e+09
vllm:request_success_total{engine="0",finished_reason="stop",model_name="tiny"} 0.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="tiny"} 2.0
vllm:request_success_total{engine="0",finished_reason="abort",model_name="tiny"} 1.0
"""


def test_parse_real_exposition_sums_label_sets():
    v = parse_prometheus(REAL_METRICS)
    assert v == {
        "vllm:num_requests_running": 2.0,
        "vllm:num_requests_waiting": 0.0,
        "vllm:generation_tokens_total": 32.0,
        "vllm:request_success_total": 3.0,
    }


def test_parse_sums_engines_and_tolerates_spaces_in_labels():
    text = (
        'vllm:generation_tokens_total{engine="0",model_name="a b}c"} 10\n'
        'vllm:generation_tokens_total{engine="1",model_name="a b}c"} 5 1712345678\n'
        "vllm:num_requests_running 3\n"
    )
    assert parse_prometheus(text) == {GENERATED: 15.0, RUNNING: 3.0}


def test_a_page_without_vllm_series_is_an_error_sample():
    s = from_text("# nothing here\nprocess_cpu_seconds_total 1.0\n", t=0.0)
    assert not s.ok and "generation_tokens_total" in s.error


def test_scrape_over_http_and_a_closed_port():
    paths = []
    with serving(lambda path: paths.append(path) or REAL_METRICS.encode()) as url:
        s = scrape(url + "/")
        assert s.ok and (s.running, s.waiting, s.generated, s.finished) == (2.0, 0.0, 32.0, 3.0)
        assert s.as_dict()["vllm:num_requests_running"] == 2.0
    assert paths == ["/metrics"]
    s = scrape(f"http://127.0.0.1:{free_port()}", timeout_s=1)
    assert not s.ok and "Connection refused" in s.error


# The prefix-cache counters as vLLM 0.32.0 exposes them (prometheus_client adds `_total`).
CACHE_METRICS = """\
vllm:prefix_cache_queries_total{{engine="0",model_name="tiny"}} {q}
vllm:prefix_cache_queries_created{{engine="0",model_name="tiny"}} 1.7e+09
vllm:prefix_cache_hits_total{{engine="0",model_name="tiny"}} {h}
vllm:external_prefix_cache_queries_total{{engine="0",model_name="tiny"}} {q}
vllm:external_prefix_cache_hits_total{{engine="0",model_name="tiny"}} {eh}
"""


def test_prefix_cache_hit_rate_between_two_readings():
    import inspect

    import vllm.v1.metrics.loggers as loggers

    source = inspect.getsource(loggers)
    for name in PREFIX_CACHE + EXTERNAL_PREFIX_CACHE:
        assert f'name="{name.removesuffix("_total")}"' in source, f"vLLM no longer defines {name}"
    read = lambda **v: parse_prometheus(CACHE_METRICS.format(**v), PREFIX_CACHE + EXTERNAL_PREFIX_CACHE)  # noqa: E731
    before, after = read(q=1000, h=0, eh=0), read(q=5000, h=1000, eh=0)
    assert hit_rate(before, after, PREFIX_CACHE) == 0.25 and hit_rate(before, after, EXTERNAL_PREFIX_CACHE) == 0.0
    assert hit_rate(before, before, PREFIX_CACHE) is None  # nothing queried: prefix caching off
    assert hit_rate({}, after, PREFIX_CACHE) is None  # a failed scrape
    assert cache_counters(f"http://127.0.0.1:{free_port()}") == {}


def _feed(watch: StallWatch, samples):
    for s in samples:
        stall = watch.observe(s)
        if stall:
            return s.t, stall
    return None, None


def test_the_seeds_stall_two_running_one_token():
    # 16k C=2 in the seed: both accepted, one token, then nothing.
    w = StallWatch(stall_timeout_s=300, first_token_timeout_s=900)
    samples = [Sample(0, 0, 2, 100, 5), Sample(2, 2, 0, 100, 5), Sample(40, 2, 0, 101, 5)]
    samples += [Sample(40 + 2 * i, 2, 0, 101, 5) for i in range(1, 200)]
    t, stall = _feed(w, samples)
    assert t == 340  # 300 s after the token at t=40, not before
    assert "no new token for 300 s with 2 request(s) running" in stall.reason
    assert "1 token(s) generated in this row" in stall.reason
    assert stall.metrics["last"] == {
        "vllm:num_requests_running": 2,
        "vllm:num_requests_waiting": 0,
        "vllm:generation_tokens_total": 101,
        "vllm:request_success_total": 5,
    }
    assert stall.metrics["generated_in_row"] == 1


def test_long_prefill_gets_the_first_token_allowance():
    w = StallWatch(stall_timeout_s=30, first_token_timeout_s=200)
    prefill = [Sample(t, 1, 0, 50, 0) for t in range(0, 200, 5)]  # no token for 195 s: fine
    assert _feed(w, prefill) == (None, None)
    t, stall = _feed(w, [Sample(200, 1, 0, 50, 0)])
    assert t == 200 and stall.reason.startswith("no first token for 200 s")


def test_steady_decode_and_idle_never_stall():
    w = StallWatch(stall_timeout_s=10, first_token_timeout_s=10)
    decode = [Sample(t, 4, 0, 1000 + t, 0) for t in range(0, 1000, 2)]
    idle = [Sample(t, 0, 0, 1998, 4) for t in range(1000, 2000, 2)]  # client between phases
    assert _feed(w, decode + idle) == (None, None)
    # Waiting requests with nothing running and no token: stalled too (a stuck scheduler).
    t, stall = _feed(w, [Sample(t, 0, 3, 1998, 4) for t in range(2000, 2100, 2)])
    assert t == 2008 and "0 request(s) running and 3 waiting" in stall.reason  # idle until 1998


def test_silent_metrics_endpoint_stalls_after_the_timeout():
    w = StallWatch(stall_timeout_s=20, first_token_timeout_s=100)
    ok = [Sample(0, 2, 0, 10, 0), Sample(1, 2, 0, 11, 0)]
    silent = [Sample(t, error="TimeoutError: timed out") for t in range(2, 60)]
    t, stall = _feed(w, ok + silent)
    assert t == 21 and stall.reason.startswith("/metrics did not answer for 20 s (TimeoutError")
    assert stall.metrics["last"]["vllm:generation_tokens_total"] == 11


@pytest.mark.parametrize("bad", [Sample(0, error="URLError"), Sample(0, running=1.0)])
def test_bad_samples_are_not_ok(bad):
    assert not bad.ok

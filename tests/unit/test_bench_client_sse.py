"""The bench client's SSE parser survives every transport split (patch bench_client_sse_data_space).

Replays a completions stream through vLLM 0.32.0's own StreamedResponseHandler the way its
request functions feed it (each chunk strip()ped), split at every position: the stock parser
fails some splits, the patched one parses every event of every split.
"""

import json

import pytest

from vllm_ampere.patches.bench_client_sse_data_space import PATCH

EVENTS = [{"id": "cmpl-1", "choices": [{"index": 0, "text": f"tok{i}", "finish_reason": None}]} for i in range(3)]
EVENTS.append({"id": "cmpl-1", "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}})
STREAM = "".join(f"data: {json.dumps(e)}\n\n" for e in EVENTS) + "data: [DONE]\n\n"


def replay(add_chunk, chunks: list[bytes]) -> list:
    """What the request function makes of `chunks` (endpoint_request_func.py, openai completions)."""
    from vllm.benchmarks.lib.endpoint_request_func import StreamedResponseHandler

    handler, events = StreamedResponseHandler(), []
    for chunk in chunks:
        chunk = chunk.strip()
        if not chunk:
            continue
        for message in add_chunk(handler, chunk):
            payload = message.removeprefix("data: ")
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def splits(data: bytes):
    for i in range(1, len(data)):
        yield i, [data[:i], data[i:]]


def test_stock_parser_fails_a_split_after_data_colon():
    stock, data = PATCH.original(), STREAM.encode()
    failed = []
    for i, chunks in splits(data):
        try:
            assert replay(stock, chunks) == EVENTS + ["[DONE]"]
        except (json.JSONDecodeError, AssertionError):
            failed.append(i)
    assert failed, "the stock parser survived every split: the patch is no longer needed"
    assert data[failed[0] - len(b"data:"):failed[0]] == b"data:"


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 5, 64])
def test_patched_parser_survives_every_split(chunk_size):
    from vllm.benchmarks.lib.endpoint_request_func import StreamedResponseHandler

    patched = PATCH.replace(PATCH.original())
    data = STREAM.encode()
    if chunk_size is None:
        cases = list(splits(data))
    else:
        cases = [(chunk_size, [data[i:i + chunk_size] for i in range(0, len(data), chunk_size)])]
    for where, chunks in cases:
        assert replay(patched, chunks) == EVENTS + ["[DONE]"], f"split {where}"
    assert StreamedResponseHandler.add_chunk is not patched  # the test did not install it


def test_only_the_bench_serve_process_needs_it(monkeypatch):
    monkeypatch.setattr("sys.argv", ["vllm", "bench", "serve", "--model", "m"])
    assert PATCH.needed()
    monkeypatch.setattr("sys.argv", ["vllm", "serve", "m"])
    assert not PATCH.needed()

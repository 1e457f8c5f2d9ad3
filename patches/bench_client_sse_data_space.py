"""Keep `vllm bench serve` from failing a request whose stream was split right after `data:`."""

from __future__ import annotations

import functools
import re
import sys

from vllm_ampere.patching import Patch

# An event's `data:` field name with its value glued on: the optional space after the colon
# (SSE allows both forms) was stripped at a transport-chunk boundary. Events start the buffer or
# follow a blank line; JSON payloads escape newlines, so "\n\n" never occurs inside one.
_BARE_DATA_FIELD = re.compile(r"(^|\n\n)data:(?=[^ ])")


def restore_data_space(buffer: str) -> str:
    return _BARE_DATA_FIELD.sub(r"\1data: ", buffer)


def _replace(add_chunk):
    @functools.wraps(add_chunk)
    def add_chunk_restoring_data_space(self, chunk_bytes):
        self.buffer = restore_data_space(self.buffer + self._decoder.decode(chunk_bytes))
        return add_chunk(self, b"")  # the stock parser, on the repaired buffer

    return add_chunk_restoring_data_space


PATCH = Patch(
    name="bench_client_sse_data_space",
    target="vllm.benchmarks.lib.endpoint_request_func:StreamedResponseHandler.add_chunk",
    signature="(self, chunk_bytes: bytes) -> list[str]",
    why="vLLM's streaming bench clients strip() every transport chunk before this parser sees it. "
    "A chunk ending in `data: ` loses its space, the event reaches the parser as `data:{...}`, "
    "which neither its complete-message check nor the caller's removeprefix('data: ') knows: "
    "the request fails with JSONDecodeError (or the event waits and is glued to the next), and "
    "a `vllm-ampere bench` row fails although the server answered (seen in this project's e2e "
    "runs; upstream fix proposed in vllm-project/vllm PR #51172).",
    how="Before the stock parser runs, puts back the space after an event's `data:` field name "
    "where it is missing; everything else (splitting, the complete-JSON check) stays stock.",
    vllm_checked="0.32.0",
    processes=("bench client",),
    remove_when="vLLM's bench clients hand transport chunks to StreamedResponseHandler unstripped "
    "(vllm-project/vllm PR #51172).",
    replace=_replace,
    # Only the `vllm bench serve` process runs the client; no other process imports it for this.
    needed=lambda: sys.argv[1:3] == ["bench", "serve"],
)

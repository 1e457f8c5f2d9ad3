"""The stall rule: requests are running on the server but no token is generated for too long.

This is the seed's 16k C=2 failure: `vllm:num_requests_running` 2, `vllm:generation_tokens_total`
1, nothing more for minutes while the client waits forever on its streams. The watchdog only
decides; the runner scrapes /metrics, feeds it samples and stops the client when it fires.

Two clocks, both reset by any new generated token:
- before the row's first generated token the allowance is `first_token_timeout_s` (prefill of a
  long prompt produces no generation token for as long as its TTFT, and vLLM exports prefill
  progress only when the first token is out: vllm/v1/metrics/stats.py, IterationStats);
- after it, `stall_timeout_s`.
While the server is idle (nothing running or waiting: the client is still starting or
tokenizing) the clock does not run; the runner's row timeout bounds that phase.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm_ampere.bench.metrics import Sample


@dataclass(frozen=True)
class Stall:
    reason: str
    metrics: dict  # what the watchdog saw: first and last samples, seconds without progress


@dataclass
class StallWatch:
    stall_timeout_s: float
    first_token_timeout_s: float
    first: Sample | None = None  # first good sample of the row: the token baseline
    last_ok: Sample | None = None
    progress_t: float | None = None  # when the clock last restarted

    def observe(self, s: Sample) -> Stall | None:
        """Feed one scrape; return a Stall when the row must be named stalled."""
        if self.progress_t is None:
            self.progress_t = s.t
        if not s.ok:
            silent = s.t - (self.last_ok.t if self.last_ok else self.progress_t)
            if silent >= self.stall_timeout_s:
                return Stall(f"/metrics did not answer for {silent:.0f} s ({s.error})", self.snapshot(s))
            return None
        if self.first is None:
            self.first = s
        progressed = self.last_ok is not None and s.generated > self.last_ok.generated
        idle = not (s.running or s.waiting)
        self.last_ok = s
        if progressed or idle:
            self.progress_t = s.t
            return None
        before_first = s.generated <= self.first.generated
        limit = self.first_token_timeout_s if before_first else self.stall_timeout_s
        stuck = s.t - self.progress_t
        if stuck < limit:
            return None
        what = "no first token" if before_first else "no new token"
        return Stall(
            f"{what} for {stuck:.0f} s with {s.running:g} request(s) running and "
            f"{s.waiting or 0:g} waiting; {s.generated - self.first.generated:g} token(s) "
            f"generated in this row",
            self.snapshot(s),
        )

    def snapshot(self, s: Sample) -> dict:
        return {
            "first": self.first.as_dict() if self.first else None,
            "last": (self.last_ok.as_dict() if self.last_ok else None),
            "last_scrape_error": s.error,
            "seconds_without_progress": round(s.t - self.progress_t, 1),
            "generated_in_row": (
                self.last_ok.generated - self.first.generated if self.first and self.last_ok else None
            ),
        }

"""A latency SLO, whether a run met it, and how to tell early that it cannot.

The paper's rule (WORKLOADS.md): P99 TBT <= X and median scheduling delay <= 2 s. The client
cannot see scheduling delay (arrival at the scheduler to first scheduling) unless the server
reports it; median TTFT is an upper bound on it (it adds the prefill and one network hop), so a
TTFT bound is the conservative stand-in until then.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from benchmarks.serving.metrics import RunSummary, max_violations_within
from benchmarks.serving.records import RequestRecord


@dataclass(frozen=True)
class Slo:
    p99_tbt_s: float | None = None
    p99_ttft_s: float | None = None
    p50_ttft_s: float | None = None
    p50_scheduling_delay_s: float | None = None
    # A probe with a failed request (timeout, RESOURCE_EXHAUSTED) fails: the SLO is about
    # serving every request, not the ones that happened to get through.
    allow_failures: bool = False

    def describe(self) -> str:
        parts = [
            f"{name} <= {bound * 1e3:.0f} ms"
            for name, bound in (
                ("P99 TBT", self.p99_tbt_s),
                ("P99 TTFT", self.p99_ttft_s),
                ("P50 TTFT", self.p50_ttft_s),
                ("P50 scheduling delay", self.p50_scheduling_delay_s),
            )
            if bound is not None
        ]
        return ", ".join(parts) or "no bound"

    def violations(self, summary: RunSummary) -> list[str]:
        """What the run broke; empty when it met the SLO."""
        broken = []
        if summary.num_failed and not self.allow_failures:
            broken.append(f"{summary.num_failed} requests failed")
        checks = (
            ("P99 TBT", summary.tbt_s.p99, self.p99_tbt_s),
            ("P99 TTFT", summary.ttft_s.p99, self.p99_ttft_s),
            ("P50 TTFT", summary.ttft_s.p50, self.p50_ttft_s),
            ("P50 scheduling delay", summary.scheduling_delay_s.p50, self.p50_scheduling_delay_s),
        )
        for name, value, bound in checks:
            if bound is None:
                continue
            if value != value:  # NaN: nothing measured, e.g. the server does not report it
                if name == "P50 scheduling delay":
                    continue
                broken.append(f"{name} not measured")
            elif value > bound:
                broken.append(f"{name} {value * 1e3:.0f} ms > {bound * 1e3:.0f} ms")
        return broken


class EarlyFailRule:
    """Stops a probe as soon as its SLO is certainly broken: once more samples exceed a bound
    than the percentile allows, no later sample can bring it back. An overloaded probe would
    otherwise spend minutes draining its queue only to fail anyway.

    Samples still pending count too: a request waiting longer than the TTFT bound for its first
    token, or longer than the TBT bound for its next one, will exceed the bound when it arrives.
    Gaps are counted incrementally (it runs every 100 ms beside the client, over up to millions
    of gaps in a long GPU probe).
    """

    def __init__(self, slo: Slo, output_lengths: Sequence[int]) -> None:
        self.slo = slo
        self.num_requests = len(output_lengths)
        self.num_tbt_gaps = sum(max(0, n - 1) for n in output_lengths)
        # Per request index: (chunks already looked at, how many of their gaps exceeded the bound).
        self._tbt_seen: dict[int, tuple[int, int]] = {}

    def __call__(self, records: Sequence[RequestRecord], now_s: float) -> str | None:
        if not self.slo.allow_failures and any(r.error for r in records):
            return "a request failed"
        for name, q, bound in (("P99 TTFT", 99, self.slo.p99_ttft_s), ("P50 TTFT", 50, self.slo.p50_ttft_s)):
            if bound is not None:
                over = sum(_first_token_late(r, now_s, bound) for r in records)
                if over > max_violations_within(self.num_requests, q):
                    return f"{name} bound broken by {over} of {self.num_requests} requests"
        bound = self.slo.p99_tbt_s
        if bound is not None and self.num_tbt_gaps > 0:
            over = sum(self._tbt_over(r, now_s, bound) for r in records)
            if over > max_violations_within(self.num_tbt_gaps, 99):
                return f"P99 TBT bound broken by {over} of {self.num_tbt_gaps} gaps"
        return None

    def _tbt_over(self, record: RequestRecord, now_s: float, bound: float) -> int:
        times = record.chunk_times_s
        seen, over = self._tbt_seen.get(record.index, (1, 0))
        for i in range(max(seen, 1), len(times)):
            over += times[i] - times[i - 1] > bound
        self._tbt_seen[record.index] = (max(seen, len(times)), over)
        still_streaming = times and record.finished_s is None and record.error is None
        pending_late = bool(still_streaming and now_s - times[-1] > bound)
        return over + pending_late


def _first_token_late(record: RequestRecord, now_s: float, bound: float) -> bool:
    if record.chunk_times_s:
        return record.chunk_times_s[0] - record.arrival_s > bound
    return record.sent_s is not None and now_s - record.arrival_s > bound

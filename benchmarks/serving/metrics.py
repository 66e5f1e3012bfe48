"""Summaries of a run: P50/P90/P99/max of each latency, and throughput.

Percentiles are nearest-rank (numpy's `inverted_cdf`): the P99 is a latency some request
actually saw, the smallest value that at least 99% of the samples do not exceed. That is the
reading an SLO check wants, and it makes hand-built timelines give exact answers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from benchmarks.serving.records import RequestRecord


@dataclass(frozen=True)
class Distribution:
    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    max: float

    @staticmethod
    def empty() -> Distribution:
        nan = float("nan")
        return Distribution(0, nan, nan, nan, nan, nan)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, q in [0, 100]; NaN for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside [0, 100]")
    if len(values) == 0:
        return float("nan")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q, method="inverted_cdf"))


def max_violations_within(count: int, q: float) -> int:
    """How many of `count` samples may exceed a bound while the nearest-rank q-th percentile
    still meets it: the percentile is the ceil(q/100 * count)-th smallest sample."""
    return count - math.ceil(q / 100 * count)


def summarize(values: Iterable[float]) -> Distribution:
    array = np.asarray(list(values), dtype=np.float64)
    if array.size == 0:
        return Distribution.empty()
    return Distribution(
        count=int(array.size),
        mean=float(array.mean()),
        p50=percentile(array, 50),
        p90=percentile(array, 90),
        p99=percentile(array, 99),
        max=float(array.max()),
    )


@dataclass(frozen=True)
class RunSummary:
    num_requests: int
    num_completed: int
    num_failed: int
    duration_s: float  # first scheduled arrival to the last Finished message
    request_throughput: float  # completed requests per second
    output_token_throughput: float  # tokens received per second (all requests)
    ttft_s: Distribution
    tbt_s: Distribution  # over every inter-token gap of every request
    e2e_s: Distribution
    normalized_latency_s: Distribution  # seconds per output token
    scheduling_delay_s: Distribution  # empty unless the server reports it
    send_lag_s: Distribution  # the client's own lateness; should be milliseconds at most


def summarize_run(records: Sequence[RequestRecord]) -> RunSummary:
    completed = [r for r in records if r.completed]
    ends = [r.finished_s for r in completed if r.finished_s is not None]
    start = min((r.arrival_s for r in records), default=0.0)
    duration = max(ends) - start if ends else 0.0
    num_tokens = sum(r.num_received_tokens for r in records)
    return RunSummary(
        num_requests=len(records),
        num_completed=len(completed),
        num_failed=len(records) - len(completed),
        duration_s=duration,
        request_throughput=len(completed) / duration if duration > 0 else 0.0,
        output_token_throughput=num_tokens / duration if duration > 0 else 0.0,
        ttft_s=summarize(r.ttft_s for r in records if r.ttft_s is not None),
        tbt_s=summarize(gap for r in records for gap in r.tbt_gaps_s),
        e2e_s=summarize(r.e2e_s for r in completed if r.e2e_s is not None),
        normalized_latency_s=summarize(
            r.normalized_latency_s for r in completed if r.normalized_latency_s is not None
        ),
        scheduling_delay_s=summarize(
            r.scheduling_delay_s for r in records if r.scheduling_delay_s is not None
        ),
        send_lag_s=summarize(r.send_lag_s for r in records if r.send_lag_s is not None),
    )

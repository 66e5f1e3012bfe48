"""One benchmark run against a server: warm it up, drive the workload with a progress bar,
summarize."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from rich.console import Console

from benchmarks.serving.client import ClientOptions, ServerInfo, StopRule, run_workload
from benchmarks.serving.metrics import RunSummary, percentile, summarize_run
from benchmarks.serving.progress import run_progress
from benchmarks.serving.records import RequestRecord
from benchmarks.serving.server_metrics import MetricsTimeline, sample_metrics
from benchmarks.serving.workload import RequestSpec

WARMUP_PROMPT_TOKENS = 64
WARMUP_OUTPUT_TOKENS = 8


@dataclass
class BenchResult:
    label: str
    server: ServerInfo
    records: list[RequestRecord]
    summary: RunSummary
    stopped_early: str | None
    server_metrics: MetricsTimeline | None = None  # sampled from the server's /metrics, if given


async def warm_up(address: str, num_requests: int, options: ClientOptions) -> None:
    """A few concurrent requests first, so one-time costs (allocator growth, lazy init) do not
    land in the measured P99."""
    if num_requests <= 0:
        return
    specs = [RequestSpec(i, WARMUP_PROMPT_TOKENS, WARMUP_OUTPUT_TOKENS, 0.0) for i in range(num_requests)]
    run = await run_workload(address, specs, options)
    failed = [r.error for r in run.records if not r.completed]
    if failed:
        raise RuntimeError(f"warm-up requests failed: {failed[0]}")


async def run_bench(
    address: str,
    specs: Sequence[RequestSpec],
    label: str,
    options: ClientOptions | None = None,
    stop_rule: StopRule | None = None,
    console: Console | None = None,
    show_progress: bool = True,
    metrics_url: str | None = None,
) -> BenchResult:
    stop_sampling = asyncio.Event()
    sampler = asyncio.create_task(sample_metrics(metrics_url, stop_sampling)) if metrics_url else None
    try:
        if show_progress:
            with run_progress(label, len(specs), console) as on_progress:
                run = await run_workload(address, specs, options, on_progress, stop_rule)
        else:
            run = await run_workload(address, specs, options, None, stop_rule)
    finally:
        stop_sampling.set()
        timeline = await sampler if sampler is not None else None
    return BenchResult(
        label,
        run.server,
        run.records,
        summarize_run(run.records),
        run.stopped_early,
        timeline.shifted(run.clock_start) if timeline is not None else None,
    )


DECODE_PROBE_PROMPT_TOKENS = 32
DECODE_PROBE_OUTPUT_TOKENS = 64


async def measure_decode_time_s(address: str, options: ClientOptions) -> float:
    """Median gap between tokens of one request alone on the server: the batch-1 decode
    iteration time (plus streaming), the unit in which the issue states SLOs (5x strict, 25x
    relaxed)."""
    spec = RequestSpec(0, DECODE_PROBE_PROMPT_TOKENS, DECODE_PROBE_OUTPUT_TOKENS, 0.0)
    run = await run_workload(address, [spec], options)
    gaps = run.records[0].tbt_gaps_s
    if not run.records[0].completed or not gaps:
        raise RuntimeError(f"the decode-time probe failed: {run.records[0].error}")
    return percentile(gaps, 50)

"""The capacity command's per-policy work: the saturated run that sets the search bracket,
the probe (a workload run judged against the SLO), and the files of each policy's run at its
capacity."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path

from rich.console import Console

from benchmarks.serving.bench import BenchResult, run_bench
from benchmarks.serving.capacity import CapacityResult, Probe, SearchParams, search_capacity
from benchmarks.serving.cli_common import Endpoint, throughput_line
from benchmarks.serving.client import ClientOptions
from benchmarks.serving.metrics import RunSummary
from benchmarks.serving.report import plot_cdfs, write_run_report
from benchmarks.serving.server_metrics import wait_until_idle
from benchmarks.serving.slo import EarlyFailRule, Slo
from benchmarks.serving.workload import WorkloadConfig, build_workload, probe_workload

AUTO_INITIAL_FRACTION = 0.5
AUTO_MIN_FRACTION = 1 / 8
# Between probes: the server must have dropped the previous probe's cancelled requests.
IDLE_TIMEOUT_S = 60.0
SETTLE_WITHOUT_METRICS_S = 2.0


def search_params(args: argparse.Namespace, saturation_rate: float | None) -> SearchParams:
    """With --initial-rate auto the bracket starts at half the saturated throughput and ends at
    it: a probe costs (requests / rate) seconds, so starting far below capacity and halving
    towards it is what makes a CPU search slow."""
    min_rate = args.min_rate
    max_rate = SearchParams.max_rate
    if args.initial_rate == "auto":
        assert saturation_rate is not None
        initial = max(saturation_rate * AUTO_INITIAL_FRACTION, args.min_rate)
        # A probe at rate r lasts num_requests / r seconds: below a small fraction of the
        # saturated throughput a search would spend many minutes to report "about none".
        min_rate = max(min_rate, saturation_rate * AUTO_MIN_FRACTION)
        # No rate above the saturated throughput is sustainable: its queue grows without bound.
        # A short probe can still pass there (the queue has no time to grow), so cap the search.
        max_rate = saturation_rate
    else:
        initial = float(args.initial_rate)
    return SearchParams(
        initial_rate=initial,
        min_rate=min(min_rate, initial),
        max_rate=max(max_rate, initial),
        max_probes=args.max_probes,
        rel_tol=args.rel_tol,
    )


async def search_policy(
    policy: str,
    endpoint: Endpoint,
    config: WorkloadConfig,
    slo: Slo,
    options: ClientOptions,
    args: argparse.Namespace,
    console: Console,
) -> tuple[CapacityResult, BenchResult | None]:
    runs: dict[float, BenchResult] = {}
    saturation_rate = None
    if args.initial_rate == "auto":
        saturated = await run_bench(
            endpoint.address,
            build_workload(replace(config, arrivals="static")),
            f"{policy} saturated",
            options,
            console=console,
            show_progress=not args.no_progress,
        )
        saturation_rate = saturated.summary.request_throughput
        console.print(f"  {policy}: {throughput_line(saturated.summary)}")
    params = search_params(args, saturation_rate)
    probe = policy_probe(policy, endpoint, config, slo, options, args, console, runs)
    result = await search_capacity(policy, probe, params)
    result.saturation_rate = saturation_rate
    return result, runs.get(result.capacity_rate) if result.capacity_rate > 0 else None


def probe_violations(slo: Slo, summary: RunSummary, stopped_early: str | None) -> list[str]:
    """What a probe broke; empty when it met the SLO. An early stop cancels the requests still
    running: they are not failures of their own, the stop is the verdict."""
    return [f"stopped early: {stopped_early}"] if stopped_early else slo.violations(summary)


def probe_line(label: str, summary: RunSummary, violations: Sequence[str]) -> str:
    verdict = "[green]meets SLO[/]" if not violations else f"[red]misses[/] ({'; '.join(violations)})"
    s = summary
    return (
        f"  {label}: P99 TBT {s.tbt_s.p99 * 1e3:.0f} ms, P50 TTFT {s.ttft_s.p50 * 1e3:.0f} ms, "
        f"P99 TTFT {s.ttft_s.p99 * 1e3:.0f} ms: {verdict}"
    )


def policy_probe(
    policy: str,
    endpoint: Endpoint,
    config: WorkloadConfig,
    slo: Slo,
    options: ClientOptions,
    args: argparse.Namespace,
    console: Console,
    runs: dict[float, BenchResult],
) -> Callable[[float], Awaitable[Probe]]:
    """The probe of one server for search_capacity: the workload at `rate` (at least
    args.probe_seconds of arrivals), judged against the SLO; each run is kept in `runs`."""

    async def probe(rate: float) -> Probe:
        specs = build_workload(probe_workload(config, rate, args.probe_seconds))
        rule = EarlyFailRule(slo, [s.num_output_tokens for s in specs])
        if endpoint.metrics_url is None:
            await asyncio.sleep(SETTLE_WITHOUT_METRICS_S)
        elif not await wait_until_idle(endpoint.metrics_url, IDLE_TIMEOUT_S):
            console.print(f"  [yellow]the server still holds requests after {IDLE_TIMEOUT_S:.0f} s[/]")
        label = f"{policy} @ {rate:.3g} req/s"
        run = await run_bench(
            endpoint.address, specs, label, options, rule, console, not args.no_progress, endpoint.metrics_url
        )
        violations = probe_violations(slo, run.summary, run.stopped_early)
        runs[rate] = run
        console.print(probe_line(label, run.summary, violations))
        return Probe(rate, not violations, tuple(violations), run.summary, run.stopped_early)

    return probe


def write_best_runs(out_dir: Path, runs: dict[str, BenchResult], slo: Slo, metadata: dict) -> None:
    """Per policy, the run at its capacity (JSON, CSV, CDFs), and CDFs of all policies together."""
    for policy, run in runs.items():
        write_run_report(
            out_dir / "at_capacity", policy, run.records, run.summary, metadata, run.server_metrics
        )
    if runs:
        ttft = {p: [r.ttft_s for r in run.records if r.ttft_s is not None] for p, run in runs.items()}
        tbt = {p: [g for r in run.records for g in r.tbt_gaps_s] for p, run in runs.items()}
        plot_cdfs(ttft, "TTFT (s)", "TTFT at capacity", out_dir / "ttft_cdf.png")
        plot_cdfs(tbt, "time between tokens (s)", "TBT at capacity", out_dir / "tbt_cdf.png", slo.p99_tbt_s)

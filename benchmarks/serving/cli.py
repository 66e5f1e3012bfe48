"""Command lines: `sarathi bench` -> main_bench(argv), `sarathi capacity` -> main_capacity(argv).

Both drive a server given by --address, or start a local `sarathi serve` themselves (one per
policy for capacity) and stop it afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from benchmarks.serving.bench import BenchResult, measure_decode_time_s, run_bench, warm_up
from benchmarks.serving.capacity import CapacityResult, Probe, SearchParams, search_capacity
from benchmarks.serving.capacity_report import capacity_table, write_capacity_report
from benchmarks.serving.client import ClientOptions
from benchmarks.serving.metrics import Distribution, RunSummary
from benchmarks.serving.report import plot_cdfs, write_run_report
from benchmarks.serving.server_metrics import MetricsTimeline, wait_until_idle
from benchmarks.serving.server_process import LocalServer, ServerLaunch, ServerStartError
from benchmarks.serving.slo import EarlyFailRule, Slo
from benchmarks.serving.workload import ARRIVAL_KINDS, LENGTH_KINDS, WorkloadConfig, build_workload, with_rate

AUTO_INITIAL_FRACTION = 0.5
AUTO_MIN_FRACTION = 1 / 8
# Between probes: the server must have dropped the previous probe's cancelled requests.
IDLE_TIMEOUT_S = 60.0
SETTLE_WITHOUT_METRICS_S = 2.0


def token_range(text: str) -> tuple[int, int]:
    """`128` or `64:256` (inclusive)."""
    low, _, high = text.partition(":")
    return int(low), int(high or low)


def add_server_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server")
    group.add_argument("--address", help="HOST:PORT of a running server; otherwise one is started locally")
    group.add_argument(
        "--chunk-size", type=int, help="passed to `sarathi serve` (token budget per iteration)"
    )
    group.add_argument("--model", help="passed to `sarathi serve` (default: the embedded SmolLM2-135M)")
    group.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra argument for `sarathi serve`, repeatable (e.g. --server-arg=--max-num-seqs=64)",
    )
    group.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for SERVING")
    group.add_argument(
        "--metrics-url",
        help="with --address: the server's Prometheus page (http://HOST:PORT/metrics), for the timeline",
    )


def add_workload_args(parser: argparse.ArgumentParser, arrivals: bool = True) -> None:
    group = parser.add_argument_group("workload")
    group.add_argument("--num-requests", type=int, default=32)
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--lengths", choices=LENGTH_KINDS, default="fixed")
    group.add_argument("--prompt-tokens", type=token_range, default=(128, 128), help="N or LOW:HIGH")
    group.add_argument("--output-tokens", type=token_range, default=(32, 32), help="N or LOW:HIGH")
    group.add_argument("--zipf-theta", type=float, default=1.1)
    group.add_argument("--trace", help="chat, arxiv (shipped traces) or a .csv/.jsonl path")
    group.add_argument("--length-scale", type=float, default=1.0, help="multiplies trace lengths")
    group.add_argument("--max-prompt-tokens", type=int)
    group.add_argument("--max-output-tokens", type=int)
    if arrivals:
        group.add_argument("--arrivals", choices=ARRIVAL_KINDS, default="poisson")
        group.add_argument("--rate", type=float, default=2.0, help="requests/s (poisson, gamma)")
        group.add_argument("--cv", type=float, default=1.0, help="gamma: burstiness (CV of gaps)")
        group.add_argument("--time-scale", type=float, default=1.0, help="trace arrivals: time multiplier")
    group.add_argument("--temperature", type=float, default=0.0)
    group.add_argument("--request-timeout", type=float, default=None, help="seconds per request")
    group.add_argument("--warmup", type=int, default=2, help="warm-up requests before measuring")


def add_output_args(parser: argparse.ArgumentParser, kind: str) -> None:
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help=f"default: bench_results/{kind}-<UTC time>",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs, CI)")


def workload_config(args: argparse.Namespace) -> WorkloadConfig:
    lengths = args.lengths
    if args.trace and lengths == "fixed":
        lengths = "trace"  # --trace alone means: take lengths from it
    return WorkloadConfig(
        num_requests=args.num_requests,
        seed=args.seed,
        lengths=lengths,
        prompt_tokens=args.prompt_tokens,
        output_tokens=args.output_tokens,
        zipf_theta=args.zipf_theta,
        trace=args.trace,
        length_scale=args.length_scale,
        max_prompt_tokens=args.max_prompt_tokens,
        max_output_tokens=args.max_output_tokens,
        arrivals=getattr(args, "arrivals", "poisson"),
        rate=getattr(args, "rate", 1.0),
        burstiness_cv=getattr(args, "cv", 1.0),
        time_scale=getattr(args, "time_scale", 1.0),
    )


def client_options(args: argparse.Namespace) -> ClientOptions:
    return ClientOptions(seed=args.seed, temperature=args.temperature, request_timeout_s=args.request_timeout)


def output_dir(args: argparse.Namespace, kind: str) -> Path:
    if args.output_dir is not None:
        return args.output_dir
    return Path("bench_results") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


@dataclass(frozen=True)
class Endpoint:
    address: str  # gRPC HOST:PORT
    metrics_url: str | None  # its Prometheus page, sampled during runs when known


@contextlib.contextmanager
def server_endpoint(
    args: argparse.Namespace, policy: str | None, log_dir: Path, chunk_size: int | None = None
) -> Iterator[Endpoint]:
    if args.address:
        yield Endpoint(args.address, args.metrics_url)
        return
    launch = ServerLaunch(
        policy=policy,
        chunk_size=chunk_size or args.chunk_size,
        model=args.model,
        extra_args=tuple(args.server_arg),
        startup_timeout_s=args.startup_timeout,
        log_path=log_dir / f"server-{policy or 'default'}{f'-{chunk_size}' if chunk_size else ''}.log",
    )
    with LocalServer(launch) as server:
        yield Endpoint(server.address, server.metrics_url)


def summary_table(results: Sequence[BenchResult]) -> Table:
    table = Table(title="Serving benchmark (latencies in ms)")
    table.add_column("run")
    table.add_column("metric")
    for name in ("P50", "P90", "P99", "max", "mean", "n"):
        table.add_column(name, justify="right")
    for result in results:
        s = result.summary
        rows: list[tuple[str, Distribution]] = [
            ("TTFT", s.ttft_s),
            ("TBT", s.tbt_s),
            ("e2e", s.e2e_s),
            ("per token", s.normalized_latency_s),
        ]
        if s.scheduling_delay_s.count:
            rows.append(("sched delay", s.scheduling_delay_s))
        for i, (name, d) in enumerate(rows):
            cells = [f"{v * 1e3:.1f}" for v in (d.p50, d.p90, d.p99, d.max, d.mean)]
            table.add_row(result.label if i == 0 else "", name, *cells, str(d.count))
        table.add_section()
    return table


def make_console() -> Console:
    """Rich's own width on a terminal; 120 columns into files and pipes, where it would assume
    80 and wrap the tables."""
    console = Console()
    return console if console.is_terminal else Console(width=120)


def server_line(timeline: MetricsTimeline) -> str:
    totals = timeline.run_totals()
    if not totals:
        return f"server metrics: too few samples from {timeline.url}"
    mean_ms = totals.get("mean_iteration_s", float("nan")) * 1e3
    return (
        f"server: {totals.get('iterations', 0):.0f} iterations, mean {mean_ms:.1f} ms; "
        f"{totals.get('prefill_tokens', 0):.0f} prefill and {totals.get('generated_tokens', 0):.0f} "
        f"generated tokens; {totals.get('preemptions', 0):.0f} preemptions"
    )


def throughput_line(summary: RunSummary) -> str:
    return (
        f"{summary.num_completed}/{summary.num_requests} completed in {summary.duration_s:.1f} s: "
        f"{summary.request_throughput:.2f} req/s, {summary.output_token_throughput:.0f} output tokens/s; "
        f"client send lag max {summary.send_lag_s.max * 1e3:.1f} ms"
    )


def stop_servers_on_sigterm() -> None:
    """SIGTERM (timeout, CI cancel) becomes SystemExit, so the `with LocalServer` blocks unwind
    and stop the servers this process started instead of leaving them running."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


# ---------------------------------------------------------------------------------------- bench


def bench_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sarathi bench",
        description="Drive a server with an open-loop workload over gRPC; write JSON, CSV and CDF plots.",
    )
    parser.add_argument("--policy", default=None, help="policy of the local server (and the run's label)")
    parser.add_argument("--label", default=None, help="name of the run in files and plots")
    add_server_args(parser)
    add_workload_args(parser)
    add_output_args(parser, "bench")
    return parser


def main_bench(argv: list[str] | None = None) -> int:
    args = bench_parser().parse_args(argv)
    stop_servers_on_sigterm()
    console = make_console()
    config = workload_config(args)
    out_dir = output_dir(args, "bench")
    label = args.label or args.policy or "run"
    specs = build_workload(config)
    options = client_options(args)
    with server_endpoint(args, args.policy, out_dir) as endpoint:
        console.print(f"[bold]bench[/] {label}: {len(specs)} requests against {endpoint.address}")
        asyncio.run(warm_up(endpoint.address, args.warmup, options))
        bench = run_bench(
            endpoint.address,
            specs,
            label,
            options,
            console=console,
            show_progress=not args.no_progress,
            metrics_url=endpoint.metrics_url,
        )
        result = asyncio.run(bench)
    metadata = {
        "command": ["sarathi", "bench", *(argv if argv is not None else sys.argv[1:])],
        "workload": asdict(config),
        "server": asdict(result.server),
        "address": args.address,
        "policy": args.policy,
        "chunk_size": args.chunk_size,
    }
    files = write_run_report(out_dir, label, result.records, result.summary, metadata, result.server_metrics)
    console.print(summary_table([result]))
    console.print(throughput_line(result.summary))
    if result.server_metrics is not None:
        console.print(server_line(result.server_metrics))
    console.print("wrote " + ", ".join(str(p) for p in files.paths()))
    return 0 if result.summary.num_failed == 0 else 1


# ------------------------------------------------------------------------------------- capacity


def capacity_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sarathi capacity",
        description=(
            "Find, per policy, the highest Poisson request rate that meets a latency SLO "
            "(bisection), and print one table."
        ),
    )
    parser.add_argument(
        "--policies",
        default="sarathi,vllm,orca",
        help=(
            "comma-separated NAME or NAME:CHUNK_SIZE (e.g. sarathi:128,vllm:2048); a fresh server per "
            "entry (with --address: one label for that server)"
        ),
    )
    add_server_args(parser)
    add_workload_args(parser, arrivals=False)
    # CPU-sized defaults: the chat trace at 1/32 of its lengths (prompt median 54 tokens, output
    # median 13); on a GPU use --length-scale 1 and more requests per probe.
    parser.set_defaults(num_requests=32, trace="chat", length_scale=1 / 32)
    slo = parser.add_argument_group("SLO (seconds; P99 TBT also as Nx the measured batch-1 decode time)")
    slo.add_argument("--slo-p99-tbt", default="5x", help="seconds, or e.g. 5x / 25x (default 5x: strict)")
    slo.add_argument("--slo-p99-ttft", type=float, default=None)
    slo.add_argument(
        "--slo-p50-ttft",
        type=float,
        default=2.0,
        help="stand-in for the paper's median scheduling delay <= 2 s while the server does not report it",
    )
    slo.add_argument("--slo-p50-scheduling-delay", type=float, default=2.0)
    search = parser.add_argument_group("search")
    search.add_argument(
        "--initial-rate",
        default="auto",
        help="req/s of the first probe; auto: half the throughput with all requests sent at once",
    )
    search.add_argument(
        "--min-rate",
        type=float,
        default=0.05,
        help="lowest rate probed (with auto: at least 1/8 of the saturated throughput)",
    )
    search.add_argument("--max-probes", type=int, default=6)
    search.add_argument("--rel-tol", type=float, default=0.2)
    add_output_args(parser, "capacity")
    return parser


def parse_policies(text: str) -> list[tuple[str, int | None]]:
    """`sarathi:128,vllm` -> [("sarathi", 128), ("vllm", None)]: each policy may get its own
    token budget, as in the paper (chunked prefills want a small one, vLLM's prefills a large one)."""
    entries = []
    for item in (part.strip() for part in text.split(",")):
        if item:
            name, _, chunk = item.partition(":")
            entries.append((name, int(chunk) if chunk else None))
    return entries


def parse_tbt_bound(text: str) -> tuple[float | None, float | None]:
    """(seconds, multiple of the decode time): `0.1` -> (0.1, None); `5x` -> (None, 5.0)."""
    text = text.strip().lower()
    if text in ("", "none"):
        return None, None
    if text.endswith("x"):
        return None, float(text[:-1])
    return float(text), None


def main_capacity(argv: list[str] | None = None) -> int:
    args = capacity_parser().parse_args(argv)
    policies = parse_policies(args.policies)
    if args.address and len(policies) != 1:
        raise SystemExit("with --address, give exactly one name in --policies (the running server's policy)")
    stop_servers_on_sigterm()
    console = make_console()
    out_dir = output_dir(args, "capacity")
    config = replace(workload_config(args), arrivals="poisson")
    tbt_seconds, tbt_multiple = parse_tbt_bound(args.slo_p99_tbt)
    slo = Slo(
        p99_tbt_s=tbt_seconds,
        p99_ttft_s=args.slo_p99_ttft,
        p50_ttft_s=args.slo_p50_ttft,
        p50_scheduling_delay_s=args.slo_p50_scheduling_delay,
    )
    options = client_options(args)
    results: list[CapacityResult] = []
    best_runs: dict[str, BenchResult] = {}
    decode_time_s: float | None = None
    for name, chunk_size in policies:
        policy = name if chunk_size is None else f"{name}:{chunk_size}"  # the row's label
        try:
            with server_endpoint(args, None if args.address else name, out_dir, chunk_size) as endpoint:
                address = endpoint.address
                asyncio.run(warm_up(address, args.warmup, options))
                if tbt_multiple is not None and decode_time_s is None:
                    # Once, on the first server: every policy is held to the same SLO.
                    decode_time_s = asyncio.run(measure_decode_time_s(address, options))
                    slo = replace(slo, p99_tbt_s=tbt_multiple * decode_time_s)
                    console.print(
                        f"batch-1 decode time {decode_time_s * 1e3:.1f} ms -> P99 TBT SLO "
                        f"{tbt_multiple:g}x = {slo.p99_tbt_s * 1e3:.0f} ms"
                    )
                console.print(f"[bold]{policy}[/]: SLO {slo.describe()}")
                result, best = asyncio.run(
                    _search_policy(policy, endpoint, config, slo, options, args, console)
                )
        except ServerStartError as e:
            # One policy that cannot start (not written yet, say) must not cost the others.
            console.print(f"[red]{policy}: the server did not start[/]: {e}")
            results.append(CapacityResult(policy, 0.0, error=str(e).splitlines()[0]))
            continue
        results.append(result)
        if best is not None:
            best_runs[policy] = best
    title = f"Capacity, {config.num_requests} requests per probe, workload {config.trace or config.lengths}"
    console.print(capacity_table(results, slo, title))
    metadata = {
        "command": ["sarathi", "capacity", *(argv if argv is not None else sys.argv[1:])],
        "workload": asdict(config),
        "search": {k: getattr(args, k) for k in ("initial_rate", "min_rate", "max_probes", "rel_tol")},
        "decode_time_s": decode_time_s,
        "tbt_slo_multiple": tbt_multiple,
        "chunk_size": args.chunk_size,
        "server": asdict(next(iter(best_runs.values())).server) if best_runs else None,
    }
    paths = write_capacity_report(out_dir, results, slo, metadata)
    _write_best_runs(out_dir, best_runs, slo, metadata)
    console.print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


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


async def _search_policy(
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

    async def probe(rate: float) -> Probe:
        specs = build_workload(with_rate(config, rate))
        rule = EarlyFailRule(slo, [s.num_output_tokens for s in specs])
        if endpoint.metrics_url is None:
            await asyncio.sleep(SETTLE_WITHOUT_METRICS_S)
        elif not await wait_until_idle(endpoint.metrics_url, IDLE_TIMEOUT_S):
            console.print(f"  [yellow]the server still holds requests after {IDLE_TIMEOUT_S:.0f} s[/]")
        label = f"{policy} @ {rate:.3g} req/s"
        run = await run_bench(
            endpoint.address, specs, label, options, rule, console, not args.no_progress, endpoint.metrics_url
        )
        # An early stop cancels the requests still running: they are not failures of their own.
        violations = (
            [f"stopped early: {run.stopped_early}"] if run.stopped_early else slo.violations(run.summary)
        )
        runs[rate] = run
        verdict = "[green]meets SLO[/]" if not violations else f"[red]misses[/] ({'; '.join(violations)})"
        s = run.summary
        console.print(
            f"  {label}: P99 TBT {s.tbt_s.p99 * 1e3:.0f} ms, P50 TTFT {s.ttft_s.p50 * 1e3:.0f} ms, "
            f"P99 TTFT {s.ttft_s.p99 * 1e3:.0f} ms: {verdict}"
        )
        return Probe(rate, not violations, tuple(violations), run.summary, run.stopped_early)

    result = await search_capacity(policy, probe, params)
    result.saturation_rate = saturation_rate
    return result, runs.get(result.capacity_rate) if result.capacity_rate > 0 else None


def _write_best_runs(out_dir: Path, runs: dict[str, BenchResult], slo: Slo, metadata: dict) -> None:
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

"""What `bench` and `capacity` share: argument groups, the workload and client options they
build, the server endpoint (started here or given), and console output."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from benchmarks.serving.bench import BenchResult
from benchmarks.serving.client import ClientOptions
from benchmarks.serving.metrics import Distribution, RunSummary
from benchmarks.serving.server_metrics import MetricsTimeline
from benchmarks.serving.server_process import LocalServer, ServerLaunch
from benchmarks.serving.workload import ARRIVAL_KINDS, LENGTH_KINDS, WorkloadConfig


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
        "--tbt-slo-ms", type=float,
        help="passed to `sarathi serve` (sarathi's SLO-driven token budget; capacity: per entry, "
             "NAME:CHUNK@slo in --policies)",
    )
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
    args: argparse.Namespace, policy: str | None, log_dir: Path, chunk_size: int | None = None,
    tbt_slo_ms: float | None = None,
) -> Iterator[Endpoint]:
    if args.address:
        yield Endpoint(args.address, args.metrics_url)
        return
    launch = ServerLaunch(
        policy=policy,
        chunk_size=chunk_size or args.chunk_size,
        tbt_slo_ms=tbt_slo_ms if tbt_slo_ms is not None else getattr(args, "tbt_slo_ms", None),
        model=args.model,
        extra_args=tuple(args.server_arg),
        startup_timeout_s=args.startup_timeout,
        log_path=log_dir / (f"server-{policy or 'default'}{f'-{chunk_size}' if chunk_size else ''}"
                            f"{f'-slo{tbt_slo_ms:g}' if tbt_slo_ms else ''}.log"),
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

"""Command lines: `sarathi bench` -> main_bench(argv), `sarathi capacity` -> main_capacity(argv).

Both drive a server given by --address, or start a local `sarathi serve` themselves (one per
policy for capacity) and stop it afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
from dataclasses import asdict, replace
from typing import NamedTuple

from benchmarks.serving.bench import BenchResult, measure_decode_time_s, run_bench, warm_up
from benchmarks.serving.capacity import CapacityResult
from benchmarks.serving.capacity_report import capacity_table, write_capacity_report
from benchmarks.serving.capacity_run import search_policy, write_best_runs
from benchmarks.serving.cli_common import (
    add_output_args,
    add_server_args,
    add_workload_args,
    client_options,
    make_console,
    output_dir,
    server_endpoint,
    server_line,
    stop_servers_on_sigterm,
    summary_table,
    throughput_line,
    workload_config,
)
from benchmarks.serving.iteration_trace import as_rows, iterations_since, last_step_id, plot_iterations
from benchmarks.serving.report import file_stem, write_run_report
from benchmarks.serving.server_process import ServerStartError
from benchmarks.serving.slo import Slo
from benchmarks.serving.workload import WorkloadConfig, build_workload

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
        first_step = asyncio.run(last_step_id(endpoint.address))
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
        iterations = [] if first_step is None else asyncio.run(iterations_since(endpoint.address, first_step))
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
    written = files.paths()
    if iterations:  # the scheduler's own trace: iteration time and batch make-up
        stem = out_dir / f"{file_stem(label)}_iterations"
        stem.with_suffix(".json").write_text(json.dumps(as_rows(iterations), indent=1) + "\n")
        plot_iterations(iterations, f"Iterations: {label}", stem.with_suffix(".png"))
        written += [stem.with_suffix(".json"), stem.with_suffix(".png")]
    console.print("wrote " + ", ".join(str(p) for p in written))
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
    search.add_argument(
        "--probe-seconds",
        type=float,
        default=0.0,
        help="send at least rate x this many requests per probe, so that fast probes are not bursts "
        "(default 0: always --num-requests)",
    )
    search.add_argument("--rel-tol", type=float, default=0.2)
    add_output_args(parser, "capacity")
    return parser


class PolicyEntry(NamedTuple):
    name: str
    chunk_size: int | None = None
    # `@slo`: the server runs with --tbt-slo-ms at the P99 TBT bound it is judged by ("slo");
    # `@slo=MS`: at that target. None: a fixed token budget.
    tbt_slo: str | None = None

    @property
    def label(self) -> str:
        label = self.name if self.chunk_size is None else f"{self.name}:{self.chunk_size}"
        return label if self.tbt_slo is None else f"{label}@{self.tbt_slo}"


def parse_policies(text: str) -> list[PolicyEntry]:
    """`sarathi:128,vllm,sarathi:2048@slo` -> entries: each policy may get its own token budget,
    as in the paper (chunked prefills want a small one, vLLM's prefills a large one), and sarathi
    an SLO-driven budget (`@slo`: the SLO's own P99 TBT bound; `@slo=45.8`: that many ms)."""
    entries = []
    for item in (part.strip() for part in text.split(",")):
        if item:
            spec, _, slo = item.partition("@")
            name, _, chunk = spec.partition(":")
            if slo and not re.fullmatch(r"slo(=\d+(\.\d*)?)?", slo):
                raise SystemExit(f"--policies {item!r}: after @ comes slo or slo=MS")
            entries.append(PolicyEntry(name, int(chunk) if chunk else None, slo or None))
    return entries


def parse_tbt_bound(text: str) -> tuple[float | None, float | None]:
    """(seconds, multiple of the decode time): `0.1` -> (0.1, None); `5x` -> (None, 5.0)."""
    text = text.strip().lower()
    if text in ("", "none"):
        return None, None
    if text.endswith("x"):
        return None, float(text[:-1])
    return float(text), None


def describe_workload(config: WorkloadConfig) -> str:
    """One line on the lengths a probe will send: the capacity defaults are sized for a CPU, and
    a GPU run at those lengths measures something else without noticing."""
    specs = build_workload(config)
    prompts = statistics.median(s.num_prompt_tokens for s in specs)
    outputs = statistics.median(s.num_output_tokens for s in specs)
    scale = f" x {config.length_scale:g}" if config.trace and config.length_scale != 1 else ""
    return (f"workload: {config.num_requests} requests per probe, {config.trace or config.lengths}{scale}: "
            f"prompt median {prompts:g} tokens, output median {outputs:g}"
            + (" (--length-scale 1 for the trace's own lengths)" if scale else ""))


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
    console.print(describe_workload(config))
    results: list[CapacityResult] = []
    best_runs: dict[str, BenchResult] = {}
    decode_time_s: float | None = None
    for entry in policies:
        name, chunk_size, policy = entry.name, entry.chunk_size, entry.label   # the row's label
        try:
            if entry.tbt_slo is None:
                tbt_slo_ms = None
            elif entry.tbt_slo.startswith("slo="):
                tbt_slo_ms = float(entry.tbt_slo[4:])
            elif slo.p99_tbt_s is not None:
                tbt_slo_ms = slo.p99_tbt_s * 1e3
            else:
                raise ServerStartError("@slo needs the P99 TBT bound: give --slo-p99-tbt in seconds, "
                                       "or list a fixed-budget entry first (it measures the decode time "
                                       "for a multiple), or write @slo=MS")
            with server_endpoint(args, None if args.address else name, out_dir, chunk_size,
                                 tbt_slo_ms) as endpoint:
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
                    search_policy(policy, endpoint, config, slo, options, args, console)
                )
        except ServerStartError as e:
            # One policy that cannot start (not written yet, say) must not cost the others.
            console.print(f"[red]{policy}: the server did not start[/]: {e}")
            results.append(CapacityResult(policy, 0.0, error=str(e).splitlines()[0]))
            continue
        results.append(result)
        if best is not None:
            best_runs[policy] = best
    per_probe = f"{config.num_requests} requests per probe" + (
        f" (at least {args.probe_seconds:g} s of arrivals)" if args.probe_seconds else "")
    title = f"Capacity, {per_probe}, workload {config.trace or config.lengths}"
    console.print(capacity_table(results, slo, title))
    metadata = {
        "command": ["sarathi", "capacity", *(argv if argv is not None else sys.argv[1:])],
        "workload": asdict(config),
        "search": {k: getattr(args, k) for k in ("initial_rate", "min_rate", "max_probes", "rel_tol",
                                                 "probe_seconds")},
        "decode_time_s": decode_time_s,
        "tbt_slo_multiple": tbt_multiple,
        "chunk_size": args.chunk_size,
        "server": asdict(next(iter(best_runs.values())).server) if best_runs else None,
    }
    paths = write_capacity_report(out_dir, results, slo, metadata)
    write_best_runs(out_dir, best_runs, slo, metadata)
    console.print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0

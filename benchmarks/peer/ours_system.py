"""One system of ours in a peer run: `sarathi serve` started as `sarathi capacity` starts it,
warmed up, then the offline throughput and the capacity search through gRPC, probes made by
capacity_run.policy_probe itself."""

from __future__ import annotations

import argparse
import json
import time

from rich.console import Console

from benchmarks.peer.offline import offline_specs
from benchmarks.peer.plan import PeerPlan
from benchmarks.peer.results import OfflineResult, SloAnchor, SystemResult
from benchmarks.peer.search import run_search
from benchmarks.peer.systems import SystemEntry
from benchmarks.serving.bench import run_bench, warm_up
from benchmarks.serving.capacity import Probe
from benchmarks.serving.capacity_run import policy_probe
from benchmarks.serving.cli_common import Endpoint
from benchmarks.serving.client import ClientOptions
from benchmarks.serving.iteration_trace import as_rows, iterations_since, last_step_id
from benchmarks.serving.report import file_stem
from benchmarks.serving.server_process import LocalServer, ServerLaunch, sarathi_command


def tbt_slo_ms(entry: SystemEntry, anchor: SloAnchor) -> float | None:
    """The SLO-driven budget's target: `@slo` is the bound the system is judged by, `@slo=MS`
    a target of its own; None for a fixed budget."""
    assert entry.policy is not None
    target = entry.policy.tbt_slo
    if target is None:
        return None
    if target.startswith("slo="):
        return float(target.removeprefix("slo="))
    if anchor.p99_tbt_s is None:
        raise RuntimeError("@slo needs the P99 TBT bound: give --slo-p99-tbt-ms or list a vllm:N system")
    return anchor.p99_tbt_s * 1e3


def server_args(plan: PeerPlan) -> tuple[str, ...]:
    """`sarathi serve`'s flags: the plan's, with vLLM's cap on sequences per step unless they
    set one (our default of 128 against vLLM's 256 halves the decode batch offline)."""
    if plan.vllm_max_num_seqs is None or any(a.startswith("--max-batch-size") for a in plan.server_args):
        return plan.server_args
    return (*plan.server_args, f"--max-batch-size={plan.vllm_max_num_seqs}")


def server_launch(entry: SystemEntry, plan: PeerPlan, anchor: SloAnchor) -> ServerLaunch:
    assert entry.policy is not None
    return ServerLaunch(
        policy=entry.policy.name,
        chunk_size=entry.policy.chunk_size,
        tbt_slo_ms=tbt_slo_ms(entry, anchor),
        model=plan.model,
        extra_args=server_args(plan),
        startup_timeout_s=plan.startup_timeout_s,
        log_path=plan.out_dir / f"server-{file_stem(entry.label)}.log",
        env=plan.server_env,
    )


async def run_ours_system(
    entry: SystemEntry, plan: PeerPlan, anchor: SloAnchor, result: SystemResult, console: Console
) -> None:
    launch = server_launch(entry, plan, anchor)
    flags = launch.command(0)[len(sarathi_command()) + 3:]  # after `serve --port N`
    console.print(f"[bold]{entry.label}[/]: starting our server ({' '.join(flags)})")
    started = time.perf_counter()
    with LocalServer(launch) as server:  # stopped on the way out, a time limit included
        result.startup_s = time.perf_counter() - started
        console.print(f"  {entry.label}: server up in {result.startup_s:.0f} s at {server.address}")
        options = ClientOptions(seed=plan.workload.seed)
        await warm_up(server.address, plan.warmup_requests, options)
        if plan.offline is not None:
            first_step = await last_step_id(server.address)
            run = await run_bench(
                server.address, offline_specs(plan.offline), f"{entry.label} offline", options,
                console=console, show_progress=plan.show_progress,
            )
            result.offline = OfflineResult.from_summary(
                run.summary, plan.offline.prompt_tokens, plan.offline.output_tokens
            )
            console.print(f"  {entry.label}: offline {result.offline.output_tokens_per_s:,.0f} output tok/s")
            if first_step is not None:  # the scheduler's own account of the run, iteration by iteration
                rows = as_rows(await iterations_since(server.address, first_step))
                path = plan.out_dir / f"{file_stem(entry.label)}_offline_iterations.json"
                path.write_text(json.dumps(rows) + "\n")
        if plan.search is None:
            return
        if anchor.p99_tbt_s is None:
            raise RuntimeError("no SLO: vLLM's decode step was not measured (give --slo-p99-tbt-ms)")
        slo = plan.slo(anchor.p99_tbt_s)
        # policy_probe reads these two of `sarathi capacity`'s arguments.
        args = argparse.Namespace(probe_seconds=plan.probe_seconds, no_progress=not plan.show_progress)
        endpoint = Endpoint(server.address, server.metrics_url)
        probe = policy_probe(entry.label, endpoint, plan.workload, slo, options, args, console, {})

        async def traced(rate: float) -> Probe:
            """The probe, then the scheduler's account of it, iteration by iteration."""
            first_step = await last_step_id(server.address)
            outcome = await probe(rate)
            if first_step is not None:
                rows = as_rows(await iterations_since(server.address, first_step))
                path = plan.out_dir / f"{file_stem(entry.label)}_probe_{rate:g}_iterations.json"
                path.write_text(json.dumps(rows) + "\n")
            return outcome

        await run_search(result, traced, plan.search)

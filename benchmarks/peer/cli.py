"""`python -m benchmarks.peer`: the same serving workload against vLLM 0.25's AsyncLLM
(in-process) and our server (gRPC), one system after another in this process, one table.

Per system: offline throughput (all requests at once), then the capacity search under one
strict SLO for all: P99 TBT <= 5 x vLLM's decode step at batch 32 / context 4096 (measured by the
first vLLM system, or given), median TTFT <= 2 s, Poisson probes of at least --probe-seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import asdict
from pathlib import Path

from rich.console import Console

from benchmarks.peer.offline import OfflineConfig
from benchmarks.peer.ours_system import run_ours_system
from benchmarks.peer.plan import PeerPlan
from benchmarks.peer.report import peer_table, write_peer_report
from benchmarks.peer.results import SloAnchor, SystemResult
from benchmarks.peer.search import run_within
from benchmarks.peer.systems import SystemEntry, parse_systems, run_order
from benchmarks.peer.vllm_system import run_vllm_system
from benchmarks.serving.capacity import SearchParams
from benchmarks.serving.cli_common import make_console, stop_servers_on_sigterm
from benchmarks.serving.workload import WorkloadConfig

DEFAULT_SYSTEMS = "vllm:2048,vllm:512,sarathi:512,sarathi:2048,sarathi:2048@slo"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peer", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--systems", default=DEFAULT_SYSTEMS,
        help="comma-separated: vllm:BUDGET (vLLM's max_num_batched_tokens) or our policies as in "
             "`sarathi capacity --policies` (sarathi:512, sarathi:2048@slo; ours:vllm:8192 for our "
             f"server's vllm policy). Default {DEFAULT_SYSTEMS}",
    )
    p.add_argument("--model", default="dummy:llama3-8b", help="a dummy:NAME shape, for both systems")
    p.add_argument("--max-model-len", type=int, default=8192, help="vLLM's; ours takes the model's")
    p.add_argument("--out", type=Path, default=None, help="default: bench_results/peer-<UTC time>")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--system-time-limit", type=float, default=240.0,
                   help="seconds per system, its start included; it keeps what it measured by then")
    p.add_argument("--warmup", type=int, default=2, help="warm-up requests per system")
    w = p.add_argument_group("capacity workload")
    w.add_argument("--trace", default="chat", help="chat, arxiv or a .csv/.jsonl path")
    w.add_argument("--length-scale", type=float, default=1.0, help="1: the trace's own lengths")
    w.add_argument("--num-requests", type=int, default=32, help="at least this many per probe")
    w.add_argument("--probe-seconds", type=float, default=15.0, help="at least this many s of arrivals")
    w.add_argument("--seed", type=int, default=0, help="of the lengths, arrivals and prompt ids")
    s = p.add_argument_group("search")
    s.add_argument("--initial-rate", type=float, default=4.0, help="req/s of the first probe")
    s.add_argument("--min-rate", type=float, default=0.25)
    s.add_argument("--max-rate", type=float, default=64.0)
    s.add_argument("--max-probes", type=int, default=3)
    s.add_argument("--rel-tol", type=float, default=0.2)
    s.add_argument("--skip-capacity", action="store_true")
    slo = p.add_argument_group("SLO")
    slo.add_argument("--slo-p99-tbt-ms", type=float, default=None,
                     help="the P99 TBT bound itself (45.8 = 5 x 9.16 ms, vLLM on an H200); default: "
                          "measure vLLM's decode step in this run")
    slo.add_argument("--slo-multiple", type=float, default=5.0, help="bound = this x the decode step")
    slo.add_argument("--slo-p50-ttft", type=float, default=2.0, help="seconds")
    o = p.add_argument_group("offline throughput")
    o.add_argument("--skip-offline", action="store_true")
    o.add_argument("--offline-requests", type=int, default=1000)
    o.add_argument("--offline-prompt-tokens", type=int, default=512)
    o.add_argument("--offline-output-tokens", type=int, default=256)
    v = p.add_argument_group("vLLM")
    v.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.85)
    v.add_argument("--vllm-max-num-seqs", type=int, default=256, help="0: vLLM's own default")
    v.add_argument("--vllm-enforce-eager", action="store_true")
    ours = p.add_argument_group("our server")
    ours.add_argument("--server-arg", action="append", default=None,
                      help="for `sarathi serve`, repeatable (default: --device=cuda)")
    ours.add_argument("--startup-timeout", type=float, default=300.0)
    ours.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                      help="environment of the server process, repeatable (e.g. its own PYTHONPATH, "
                           "without vLLM's folder)")
    return p


def build_plan(args: argparse.Namespace, out_dir: Path) -> PeerPlan:
    workload = WorkloadConfig(
        num_requests=args.num_requests, seed=args.seed, lengths="trace", trace=args.trace,
        length_scale=args.length_scale, arrivals="poisson",
    )
    search = None if args.skip_capacity else SearchParams(
        initial_rate=args.initial_rate, min_rate=min(args.min_rate, args.initial_rate),
        max_rate=max(args.max_rate, args.initial_rate), max_probes=args.max_probes, rel_tol=args.rel_tol,
    )
    offline = None if args.skip_offline else OfflineConfig(
        args.offline_requests, args.offline_prompt_tokens, args.offline_output_tokens, args.seed
    )
    return PeerPlan(
        out_dir=out_dir, workload=workload, search=search, probe_seconds=args.probe_seconds,
        offline=offline, system_time_limit_s=args.system_time_limit, model=args.model,
        max_model_len=args.max_model_len, warmup_requests=args.warmup, show_progress=not args.no_progress,
        slo_p50_ttft_s=args.slo_p50_ttft, vllm_gpu_memory_utilization=args.vllm_gpu_memory_utilization,
        vllm_max_num_seqs=args.vllm_max_num_seqs or None, vllm_enforce_eager=args.vllm_enforce_eager,
        server_args=tuple(args.server_arg if args.server_arg is not None else ["--device=cuda"]),
        startup_timeout_s=args.startup_timeout,
        server_env=dict(env_pair(item) for item in args.server_env),
    )


def env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SystemExit(f"--server-env {text!r}: write KEY=VALUE")
    return key, value


def run_system(entry: SystemEntry, plan: PeerPlan, anchor: SloAnchor, console: Console) -> SystemResult:
    """One system in an event loop of its own (AsyncLLM lives and dies in it)."""
    result = SystemResult(entry.label, entry.engine, entry.budget)
    run = run_vllm_system if entry.is_vllm else run_ours_system
    work = run(entry, plan, anchor, result, console)
    asyncio.run(run_within(plan.system_time_limit_s, work, result, console))
    return result


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    systems = parse_systems(args.systems)
    anchor = SloAnchor(
        args.slo_multiple, given_p99_tbt_s=None if args.slo_p99_tbt_ms is None else args.slo_p99_tbt_ms / 1e3
    )
    measure_anchor = anchor.p99_tbt_s is None and not args.skip_capacity
    if measure_anchor and not any(s.is_vllm for s in systems):
        raise SystemExit("the SLO comes from vLLM's decode step: list a vllm:N system, or give "
                         "--slo-p99-tbt-ms")
    stop_servers_on_sigterm()
    console = make_console()
    out_dir = args.out or Path("bench_results") / f"peer-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = build_plan(args, out_dir)
    by_label: dict[str, SystemResult] = {}
    for entry in run_order(systems, measure_anchor):
        by_label[entry.label] = run_system(entry, plan, anchor, console)
    results = [by_label[s.label] for s in systems]  # the table in the order given
    slo = plan.slo(anchor.p99_tbt_s) if anchor.p99_tbt_s is not None else None
    per_probe = (f"at least {args.num_requests} requests and {args.probe_seconds:g} s of Poisson arrivals "
                 "per probe")
    title = f"vLLM 0.25 vs ours, {args.model}, trace {args.trace} x {args.length_scale:g}, {per_probe}"
    console.print(peer_table(results, anchor, slo, title))
    metadata = {
        "command": ["python", "-m", "benchmarks.peer", *(argv if argv is not None else sys.argv[1:])],
        "plan": asdict(plan),
        "run_order": [s.label for s in run_order(systems, measure_anchor)],
    }
    paths = write_peer_report(out_dir, results, anchor, slo, metadata)
    console.print("wrote " + ", ".join(str(p) for p in paths))
    return 0 if any(r.error is None for r in results) else 1

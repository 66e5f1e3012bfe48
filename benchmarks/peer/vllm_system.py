"""One vLLM system of a peer run: start AsyncLLM at its token budget, warm it up, measure the
SLO anchor if it is still missing, the offline throughput, then the capacity search, with the
probe semantics of `sarathi capacity` (same workload, early-fail rule, verdict)."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

from rich.console import Console

from benchmarks.peer.offline import offline_specs
from benchmarks.peer.plan import PeerPlan
from benchmarks.peer.results import OfflineResult, SloAnchor, SystemResult
from benchmarks.peer.search import run_search
from benchmarks.peer.systems import SystemEntry
from benchmarks.peer.vllm_client import run_engine_workload
from benchmarks.peer.vllm_engine import VllmEngine, VllmOptions
from benchmarks.peer.vllm_model import model_name, write_model_folder
from benchmarks.serving.bench import WARMUP_OUTPUT_TOKENS, WARMUP_PROMPT_TOKENS
from benchmarks.serving.capacity import Probe
from benchmarks.serving.capacity_run import IDLE_TIMEOUT_S, probe_line, probe_violations
from benchmarks.serving.client import ClientRun, ServerInfo, StopRule
from benchmarks.serving.metrics import summarize_run
from benchmarks.serving.progress import run_progress
from benchmarks.serving.slo import EarlyFailRule, Slo
from benchmarks.serving.workload import RequestSpec, build_workload, probe_workload

ANCHOR_SHORT_TOKENS = 1
ANCHOR_LONG_TOKENS = 129  # step = (t(129 tokens) - t(1 token)) / 128, as the shared anchor.py
ANCHOR_REPEATS = 2


class EngineRunner:
    """Runs RequestSpecs on one engine with the plan's seed, progress bar optional."""

    def __init__(self, engine: VllmEngine, info: ServerInfo, plan: PeerPlan, console: Console) -> None:
        self.engine = engine
        self.info = info
        self.plan = plan
        self.console = console

    async def run(
        self, specs: Sequence[RequestSpec], label: str, stop_rule: StopRule | None = None
    ) -> ClientRun:
        progress = run_progress(label, len(specs), self.console) if self.plan.show_progress else nullcontext()
        with progress as on_progress:
            return await run_engine_workload(
                self.engine, specs, self.info, self.plan.workload.seed, on_progress, stop_rule
            )


def engine_info(engine: VllmEngine, plan: PeerPlan, vocab_size: int) -> ServerInfo:
    cache = engine.llm.vllm_config.cache_config
    return ServerInfo(
        f"vllm:{plan.model}", plan.max_model_len, vocab_size, int(cache.num_gpu_blocks or 0),
        int(cache.block_size or 0), "cuda",
    )


async def measure_decode_step_s(runner: EngineRunner, batch: int, context: int) -> float:
    """vLLM's decode step at this batch and context: greedy, ignore_eos, prompts sent at once;
    the prefill is in both timings and cancels out."""

    async def seconds_for(num_output_tokens: int) -> float:
        specs = [RequestSpec(i, context, num_output_tokens, 0.0) for i in range(batch)]
        run = await runner.run(specs, f"anchor b{batch} ctx{context} out{num_output_tokens}")
        failed = [r.error for r in run.records if not r.completed]
        if failed:
            raise RuntimeError(f"decode anchor request failed: {failed[0]}")
        return max(r.finished_s for r in run.records if r.finished_s is not None)

    short = min([await seconds_for(ANCHOR_SHORT_TOKENS) for _ in range(ANCHOR_REPEATS)])
    long = min([await seconds_for(ANCHOR_LONG_TOKENS) for _ in range(ANCHOR_REPEATS)])
    return (long - short) / (ANCHOR_LONG_TOKENS - ANCHOR_SHORT_TOKENS)


def engine_probe(
    label: str, runner: EngineRunner, slo: Slo, plan: PeerPlan
) -> Callable[[float], Awaitable[Probe]]:
    """capacity_run.policy_probe's counterpart for an in-process engine."""

    async def probe(rate: float) -> Probe:
        specs = build_workload(probe_workload(plan.workload, rate, plan.probe_seconds))
        rule = EarlyFailRule(slo, [s.num_output_tokens for s in specs])
        if not await runner.engine.wait_until_idle(IDLE_TIMEOUT_S):
            runner.console.print(f"  [yellow]vLLM still holds requests after {IDLE_TIMEOUT_S:.0f} s[/]")
        run_label = f"{label} @ {rate:.3g} req/s"
        run = await runner.run(specs, run_label, rule)
        summary = summarize_run(run.records)
        violations = probe_violations(slo, summary, run.stopped_early)
        runner.console.print(probe_line(run_label, summary, violations))
        return Probe(rate, not violations, tuple(violations), summary, run.stopped_early)

    return probe


async def run_vllm_system(
    entry: SystemEntry, plan: PeerPlan, anchor: SloAnchor, result: SystemResult, console: Console
) -> None:
    assert entry.budget is not None
    name = model_name(plan.model)
    options = VllmOptions(
        budget=entry.budget,
        max_model_len=plan.max_model_len,
        gpu_memory_utilization=plan.vllm_gpu_memory_utilization,
        max_num_seqs=plan.vllm_max_num_seqs,
        seed=plan.workload.seed,
        enforce_eager=plan.vllm_enforce_eager,
    )
    with tempfile.TemporaryDirectory(prefix="peer-vllm-model-") as folder:
        model_dir = write_model_folder(name, Path(folder))
        vocab_size = int(json.loads((model_dir / "config.json").read_text())["vocab_size"])
        console.print(f"[bold]{entry.label}[/]: starting vLLM AsyncLLM (budget {entry.budget})")
        started = time.perf_counter()
        async with VllmEngine(options, model_dir) as engine:
            result.startup_s = time.perf_counter() - started
            console.print(f"  {entry.label}: engine up in {result.startup_s:.0f} s")
            runner = EngineRunner(engine, engine_info(engine, plan, vocab_size), plan, console)
            warm = [RequestSpec(i, WARMUP_PROMPT_TOKENS, WARMUP_OUTPUT_TOKENS, 0.0)
                    for i in range(plan.warmup_requests)]
            if warm:
                await runner.run(warm, f"{entry.label} warm-up")
            if anchor.p99_tbt_s is None:
                step = await measure_decode_step_s(runner, plan.anchor_batch, plan.anchor_context)
                anchor.decode_step_s, anchor.measured_by = step, entry.label
                console.print(
                    f"  vLLM decode step at batch {plan.anchor_batch}, ctx {plan.anchor_context}: "
                    f"{step * 1e3:.2f} ms -> P99 TBT SLO {anchor.multiple:g}x = "
                    f"{anchor.multiple * step * 1e3:.1f} ms"
                )
            if plan.offline is not None:
                run = await runner.run(offline_specs(plan.offline), f"{entry.label} offline")
                result.offline = OfflineResult.from_summary(
                    summarize_run(run.records), plan.offline.prompt_tokens, plan.offline.output_tokens
                )
                tokens_per_s = result.offline.output_tokens_per_s
                console.print(f"  {entry.label}: offline {tokens_per_s:,.0f} output tok/s")
            if anchor.p99_tbt_s is not None and plan.search is not None:
                slo = plan.slo(anchor.p99_tbt_s)
                await run_search(result, engine_probe(entry.label, runner, slo, plan), plan.search)

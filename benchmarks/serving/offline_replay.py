"""The offline workload (N prompts of P tokens, O new tokens each, all at once) through the real
Scheduler, with each iteration costed by a linear model of its shape instead of run: how token
budget and sequences per step change the run's time on a GPU, in seconds on a CPU.

The model, fitted by least squares to a GPU run's iteration trace (`sarathi bench` writes
`<label>_iterations.json`; the peer harness `<label>_offline_iterations.json`):
    device ms = base + per_decode * decodes + per_prefill_token * prefill tokens
                + prefill_step * (1 if any prefill)
(prefill_step may come out negative: a hybrid step shares its fixed cost with its decodes).

    python -m benchmarks.serving.offline_replay --trace RUN_iterations.json \\
        --budgets 1024,2048 --max-seqs 256,512
    python -m benchmarks.serving.offline_replay --cost 4.7,0.034,0.0242,-1.8   # no trace
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protos.batch_plan import BatchPlan, SamplingOptions, StepOutput
from scheduler_service.block_manager import CacheConfig
from scheduler_service.kv_cache import make_block_manager
from scheduler_service.policies import PolicyConfig, make_policy
from scheduler_service.request import Request
from scheduler_service.scheduler import Scheduler


@dataclass(frozen=True)
class StepCost:
    base_ms: float
    per_decode_ms: float
    per_prefill_token_ms: float
    prefill_step_ms: float

    def ms(self, prefill_tokens: int, decodes: int) -> float:
        return (self.base_ms + self.per_decode_ms * decodes + self.per_prefill_token_ms * prefill_tokens
                + (self.prefill_step_ms if prefill_tokens else 0.0))

    @classmethod
    def parse(cls, text: str) -> StepCost:
        values = [float(v) for v in text.split(",")]
        if len(values) != 4:
            raise ValueError("--cost takes four numbers: base, per decode, per prefill token, "
                             "per step with a prefill (ms)")
        return cls(*values)


def fit_step_cost(rows: list[dict]) -> StepCost:
    """Least squares over a trace's iterations (num_prefill_tokens, num_decode_tokens,
    worker_device_ms); iterations that ran nothing are left out."""
    rows = [r for r in rows if r["num_prefill_tokens"] + r["num_decode_tokens"] > 0]
    if len(rows) < 4:
        raise ValueError(f"{len(rows)} iterations in the trace: too few to fit four coefficients")
    x = np.array([[1.0, r["num_decode_tokens"], r["num_prefill_tokens"], float(r["num_prefill_tokens"] > 0)]
                  for r in rows])
    y = np.array([r["worker_device_ms"] for r in rows])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    return StepCost(*(float(c) for c in coef))


def worker_output(scheduler: Scheduler, plan: BatchPlan, token: int = 3) -> StepOutput:
    """What a worker returns: a token for every sequence whose computed tokens reach the end of
    its known tokens (a decode, or a prompt's last chunk)."""
    sampled = []
    for seq_id in plan.seq_ids:
        request = scheduler.requests.get(seq_id)
        if request is not None and request.num_computed_tokens >= (request.num_prompt_tokens
                                                                   + len(request.output_token_ids)):
            sampled.append(seq_id)
    return StepOutput(plan.step_id, sampled, [token] * len(sampled))


@dataclass(frozen=True)
class Replay:
    budget: int
    max_seqs: int
    seconds: float
    iterations: int
    with_prefill: int
    output_tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds if self.seconds > 0 else 0.0


def replay(cost: StepCost, *, budget: int, max_seqs: int, requests: int, prompt: int, output: int,
           policy: str = "sarathi", block_size: int = 16) -> Replay:
    """Every request arrives at once; the KV cache holds them all (as on an 80+ GB GPU)."""
    limit = requests * (prompt + output) + 1000   # one token per iteration at worst
    blocks = requests * (-(-(prompt + output) // block_size))
    scheduler = Scheduler(make_policy(policy, PolicyConfig(token_budget=budget, max_batch_size=max_seqs)),
                          make_block_manager(blocks, block_size, CacheConfig(0.0, False, 0)))
    for i in range(requests):
        scheduler.add(Request(seq_id=i, prompt_token_ids=[7] * prompt, sampling=SamplingOptions(),
                              max_tokens=output))
    total_ms, iterations, with_prefill = 0.0, 0, 0
    while scheduler.has_work():
        if iterations == limit:
            raise RuntimeError(f"the scheduler did not finish within {limit} iterations")
        plan = scheduler.schedule()
        prefill = sum(n for n in plan.num_scheduled_tokens if n > 1)
        decodes = sum(1 for n in plan.num_scheduled_tokens if n == 1)
        total_ms += cost.ms(prefill, decodes)
        iterations += 1
        with_prefill += prefill > 0
        scheduler.update(worker_output(scheduler, plan))
    return Replay(budget, max_seqs, total_ms / 1e3, iterations, with_prefill, requests * output)


def table(results: list[Replay]) -> str:
    lines = ["| budget | seqs/step | seconds | output tok/s | iterations | with a prefill |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r.budget} | {r.max_seqs} | {r.seconds:.2f} | {r.tokens_per_s:,.0f} | {r.iterations} "
              f"| {r.with_prefill} |" for r in results]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.serving.offline_replay", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--trace", type=Path, help="an iteration trace (JSON rows) to fit the cost to")
    source.add_argument("--cost", type=StepCost.parse,
                        help="base,per_decode,per_prefill_token,prefill_step (ms)")
    ap.add_argument("--budgets", default="2048", help="token budgets, comma-separated")
    ap.add_argument("--max-seqs", default="256", help="sequences per step, comma-separated")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--output", type=int, default=256)
    args = ap.parse_args(argv)
    cost = args.cost or fit_step_cost(json.loads(args.trace.read_text()))
    print(f"step cost (ms) = {cost.base_ms:.3f} + {cost.per_decode_ms:.4f} x decodes + "
          f"{cost.per_prefill_token_ms:.5f} x prefill tokens + {cost.prefill_step_ms:.3f} if any prefill")
    results = [replay(cost, budget=int(b), max_seqs=int(m), requests=args.requests, prompt=args.prompt,
                      output=args.output)
               for b in args.budgets.split(",") for m in args.max_seqs.split(",")]
    print(f"{args.requests} x ({args.prompt} in, {args.output} out), all at once, through the scheduler:")
    print(table(results))


if __name__ == "__main__":
    main()

"""Micro-benchmark: the scheduler's time per iteration (policy + plan building), no model.

    python -m benchmarks.host.policy_overhead [--running 256] [--iterations 200]

Each policy runs with `running` requests decoding and long prompts waiting, so every iteration
walks the whole running set and tries an admission: the steady state of a busy server.
"""

from __future__ import annotations

import argparse
import statistics
import time

from protos.batch_plan import SamplingOptions, StepOutput
from scheduler_service.block_manager import CacheConfig
from scheduler_service.kv_cache import make_block_manager
from scheduler_service.policies import POLICIES, PolicyConfig, make_policy
from scheduler_service.request import Request
from scheduler_service.scheduler import Scheduler


def _output(sched: Scheduler, plan) -> StepOutput:
    done = [s for s in plan.seq_ids if s in sched.requests and sched.requests[s].num_computed_tokens
            >= sched.requests[s].num_prompt_tokens + len(sched.requests[s].output_token_ids)]
    return StepOutput(plan.step_id, done, [3] * len(done))


def time_policy(name: str, running: int, iterations: int, prefix_caching: bool) -> list[float]:
    """Seconds per schedule() call, once `running` requests decode and others wait."""
    config = PolicyConfig(token_budget=512, max_batch_size=running)
    blocks = make_block_manager(1 << 20, 16, CacheConfig(prefix_caching=prefix_caching))
    sched = Scheduler(make_policy(name, config), blocks)
    for i in range(running):
        sched.add(Request(i, [i % 50 + 1] * 64, SamplingOptions(), max_tokens=4096))
    for _ in range(10 * running):
        if len(sched.state.running) == running and all(r.is_decoding for r in sched.state.running):
            break
        plan = sched.schedule()
        sched.update(_output(sched, plan))
    for i in range(running, running + 64):  # long prompts queue behind the full batch
        sched.add(Request(i, [7] * 2048, SamplingOptions(), max_tokens=16))
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        plan = sched.schedule()
        times.append(time.perf_counter() - start)
        sched.update(_output(sched, plan))
    return times


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--running", type=int, default=256)
    p.add_argument("--iterations", type=int, default=200)
    args = p.parse_args(argv)
    print(f"scheduling time per iteration, {args.running} running requests")
    print(f"{'policy':20s} {'prefix cache':>12s} {'median ms':>10s} {'p90 ms':>8s}")
    for name in POLICIES:
        for prefix_caching in (False, True):
            times = sorted(time_policy(name, args.running, args.iterations, prefix_caching))
            p90 = times[int(0.9 * (len(times) - 1))]
            print(f"{name:20s} {'on' if prefix_caching else 'off':>12s} "
                  f"{statistics.median(times) * 1e3:10.3f} {p90 * 1e3:8.3f}")


if __name__ == "__main__":
    main()

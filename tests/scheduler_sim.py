"""Drives a Scheduler without a model: every sequence that reaches the end of its known tokens
gets a token, as a worker would. Policies decide only from counts, so this exercises them fully."""

from __future__ import annotations

from benchmarks.serving.offline_replay import worker_output as simulated_output
from protos.batch_plan import BatchPlan, SamplingOptions
from scheduler_service.block_manager import CacheConfig
from scheduler_service.kv_cache import make_block_manager
from scheduler_service.messages import RequestUpdate
from scheduler_service.policies import PolicyConfig, make_policy
from scheduler_service.request import Request
from scheduler_service.scheduler import Scheduler


def make_scheduler(policy: str = "sarathi", num_blocks: int = 1000, block_size: int = 16,
                   token_budget: int = 64, max_batch_size: int = 32, *, watermark: float = 0.01,
                   prefix_caching: bool = False, num_host_blocks: int = 0,
                   **policy_knobs) -> Scheduler:
    config = PolicyConfig(token_budget=token_budget, max_batch_size=max_batch_size, **policy_knobs)
    blocks = make_block_manager(num_blocks, block_size,
                                CacheConfig(watermark, prefix_caching, num_host_blocks))
    return Scheduler(make_policy(policy, config), blocks)


def make_request(seq_id: int, prompt_len: int, max_tokens: int, *,
                 prompt: list[int] | None = None, **kw) -> Request:
    tokens = list(prompt) if prompt is not None else [7] * prompt_len
    return Request(seq_id=seq_id, prompt_token_ids=tokens, sampling=SamplingOptions(),
                   max_tokens=max_tokens, **kw)


def step(scheduler: Scheduler) -> tuple[BatchPlan, list[RequestUpdate]]:
    plan = scheduler.schedule()
    return plan, scheduler.update(simulated_output(scheduler, plan))


def run_to_end(scheduler: Scheduler, limit: int = 5000) -> list[BatchPlan]:
    """Steps until nothing is left to do; the plans, in order. Fails if that takes too long."""
    plans = []
    for _ in range(limit):
        if not scheduler.has_work():
            return plans
        plan, _ = step(scheduler)
        plans.append(plan)
    raise AssertionError("the scheduler did not finish")

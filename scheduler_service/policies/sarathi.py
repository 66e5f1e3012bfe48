"""Sarathi-Serve's stall-free batching with chunked prefills.

Every iteration: all running decodes first (they never stall), then the partially prefilled
requests, then new ones, with prompts cut into chunks so the iteration stays within the token
budget. When blocks run out, the lowest-priority, newest request is preempted by recompute.

`sarathi_dynamic` is the same with the chunk shrunk when many decodes run, so that the
iteration's predicted time (cost_model.py) stays within target_iteration_ms.
"""

from __future__ import annotations

from scheduler_service.policies.base import Policy, ScheduleOutput, SchedulerState
from scheduler_service.policies.steps import (
    admit_chunked,
    continue_prefills,
    preempt_for_waiting_priority,
    schedule_decodes,
)


class SarathiPolicy(Policy):
    name = "sarathi"

    def schedule(self, state: SchedulerState) -> ScheduleOutput:
        out = ScheduleOutput()
        preempt_for_waiting_priority(state, out, self.config.token_budget, whole=False)
        schedule_decodes(state, out)
        budget = self.prefill_budget(out)
        budget = continue_prefills(state, out, budget)
        admit_chunked(state, out, budget, self.config.max_batch_size)
        return out

    def prefill_budget(self, out: ScheduleOutput) -> int:
        """Prefill tokens this iteration may add to the decodes already in out."""
        return self.config.token_budget - len(out.chunks)


class DynamicSarathiPolicy(SarathiPolicy):
    name = "sarathi_dynamic"

    def prefill_budget(self, out: ScheduleOutput) -> int:
        cfg = self.config
        static = super().prefill_budget(out)
        context = sum(c.request.num_computed_tokens + 1 for c in out.chunks)
        fits = cfg.cost_model.tokens_within(cfg.target_iteration_ms, len(out.chunks), context)
        # Never below min_chunk_size, so prompts progress however many decodes run; multiples of
        # it, since odd chunk sizes run slower than round ones (a chunk of 257 vs 256).
        chunk = max(cfg.min_chunk_size, fits // cfg.min_chunk_size * cfg.min_chunk_size)
        return min(static, chunk)

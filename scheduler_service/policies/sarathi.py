"""Sarathi-Serve's stall-free batching with chunked prefills.

Every iteration: all running decodes first (they never stall), then the partially prefilled
requests, then new ones, with prompts cut into chunks so the iteration stays within the token
budget. When blocks run out, the lowest-priority, newest request is preempted by recompute.

With a time-between-tokens target (tbt_slo_ms), the prefill budget is no longer fixed: each
iteration takes the most prefill tokens whose predicted device time, times one plus the learned
safety margin, stays within the target (latency_model.py: fitted online to the worker's measured
step times). The token budget stays the cap, and the smallest chunk the floor, so prompts
progress however many decodes run. The policy decides what runs in what order; the tracker only
answers how long a shape takes.

`sarathi_dynamic` is the same with the chunk shrunk when many decodes run, so that the
iteration's predicted time (cost_model.py, hand-set constants) stays within target_iteration_ms.
"""

from __future__ import annotations

from itertools import islice

from scheduler_service.policies.base import Policy, ScheduleOutput, SchedulerState
from scheduler_service.policies.latency_model import IterationShape
from scheduler_service.policies.steps import (
    admit_chunked,
    continue_prefills,
    preempt_for_waiting_priority,
    prefills_of,
    schedule_decodes,
)


class SarathiPolicy(Policy):
    name = "sarathi"

    def schedule(self, state: SchedulerState) -> ScheduleOutput:
        out = ScheduleOutput()
        preempt_for_waiting_priority(state, out, self.config.token_budget, whole=False)
        schedule_decodes(state, out)
        budget = self.prefill_budget(state, out)
        budget = continue_prefills(state, out, budget)
        admit_chunked(state, out, budget, self.config.max_batch_size)
        return out

    def prefill_budget(self, state: SchedulerState, out: ScheduleOutput) -> int:
        """Prefill tokens this iteration may add to the decodes already in out."""
        static = self.config.token_budget - len(out.chunks)
        if self.config.tbt_slo_ms is None:
            return static
        return min(static, self._slo_budget(state, out, static))

    def _slo_budget(self, state: SchedulerState, out: ScheduleOutput, cap: int) -> int:
        cfg = self.config
        assert cfg.tbt_slo_ms is not None
        step = cfg.min_chunk_size
        if not self.latency.model.ready:
            # No profile and too few iterations measured to fit: small chunks until there are.
            return max(step, cap // 4)
        # The chunks this budget would buy, in the order continue_prefills and admit_chunked
        # take them (block shortage aside: it can only make the iteration smaller).
        pending = [(r.num_computed_tokens, r.num_uncomputed_tokens) for r in prefills_of(state)
                   if r.seq_id not in out.scheduled_ids()]
        slots = max(0, cfg.max_batch_size - len(state.running))
        pending += [(r.num_computed_tokens, r.num_uncomputed_tokens)
                    for r in islice(state.waiting, slots)]
        if not pending or cap <= 0:
            return cap
        base = out.shape()
        target = cfg.tbt_slo_ms / (1.0 + self.latency.margin.value)

        def fits(budget: int) -> bool:
            shape: IterationShape = base
            for computed, uncomputed in pending:
                if budget <= 0:
                    break
                take = min(uncomputed, budget)
                shape = shape.with_chunk(computed, take)
                budget -= take
            return self.latency.predict_ms(shape) <= target

        if fits(cap):
            return cap
        # The prediction only grows with the budget (non-negative coefficients): bisect.
        lo, hi = 0, cap
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        # Never below the smallest chunk (prompts must progress), and in multiples of it, since
        # odd chunk sizes run slower than round ones.
        return max(step, lo // step * step)


class DynamicSarathiPolicy(SarathiPolicy):
    name = "sarathi_dynamic"

    def prefill_budget(self, state: SchedulerState, out: ScheduleOutput) -> int:
        cfg = self.config
        static = self.config.token_budget - len(out.chunks)
        context = sum(c.request.num_computed_tokens + 1 for c in out.chunks)
        fits = cfg.cost_model.tokens_within(cfg.target_iteration_ms, len(out.chunks), context)
        # Never below min_chunk_size, so prompts progress however many decodes run; multiples of
        # it, since odd chunk sizes run slower than round ones (a chunk of 257 vs 256).
        chunk = max(cfg.min_chunk_size, fits // cfg.min_chunk_size * cfg.min_chunk_size)
        return min(static, chunk)

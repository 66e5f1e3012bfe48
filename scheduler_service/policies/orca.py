"""Orca's iteration-level batching: every iteration runs all decodes and adds whole prompts.

Prompts are never chunked: a new request's whole prompt joins the decodes of the running ones
(a hybrid batch), as many as fit the token budget and the batch size. A prompt longer than what
is left of the budget still joins as the iteration's only prefill, so it cannot starve.
"""

from __future__ import annotations

from scheduler_service.policies.base import Policy, ScheduleOutput, SchedulerState
from scheduler_service.policies.steps import (
    admit_whole,
    continue_prefills,
    preempt_for_waiting_priority,
    schedule_decodes,
)


class OrcaPolicy(Policy):
    name = "orca"

    def schedule(self, state: SchedulerState) -> ScheduleOutput:
        out = ScheduleOutput()
        preempt_for_waiting_priority(state, out, self.config.token_budget, whole=True)
        schedule_decodes(state, out)
        budget = self.config.token_budget - len(out.chunks)
        # Whole prompts leave no partial prefills; this only guards the no-deadlock rule.
        budget = continue_prefills(state, out, budget)
        admit_whole(state, out, budget, self.config.max_batch_size)
        return out

"""FasterTransformer's request-level batching.

A batch is formed only when nothing runs: waiting requests in queue order, as many as the batch
size, the token budget (their prompts run together in the first iteration) and the KV cache
allow. Like FasterTransformer, which allocates for the maximum length up front, a request joins
only if its worst case (prompt + max_tokens) fits beside the others' worst cases, so a batch
never runs out of blocks. The batch then decodes until its last request finishes; no request
joins mid-way.
"""

from __future__ import annotations

import sys

from scheduler_service.policies.base import Policy, ScheduleOutput, SchedulerState
from scheduler_service.policies.steps import continue_prefills, schedule_decodes


class FasterTransformerPolicy(Policy):
    name = "faster_transformer"

    def schedule(self, state: SchedulerState) -> ScheduleOutput:
        out = ScheduleOutput()
        if state.running:
            schedule_decodes(state, out)
            continue_prefills(state, out, self.config.token_budget)  # no-deadlock guard only
            return out
        self._start_batch(state, out)
        return out

    def _start_batch(self, state: SchedulerState, out: ScheduleOutput) -> None:
        blocks = state.blocks
        free = blocks.num_free_blocks
        budget = self.config.token_budget
        reserved = 0
        while state.waiting and len(state.running) < self.config.max_batch_size:
            req = state.waiting[0]
            worst = blocks.blocks_for(req.max_num_tokens)
            if reserved + worst > free:
                break
            # The first prompt may exceed the budget (alone); later ones must fit what is left.
            limit = budget if out.chunks else sys.maxsize
            n = state.admit(req, out, limit, whole=True)
            if n == 0:
                break
            budget -= n
            reserved += worst

"""vLLM's original (2023) prefill-first scheduling.

When requests wait and blocks allow, an iteration prefills whole prompts only (as many as fit
the token budget, vLLM's max_num_batched_tokens, and the batch size); running decodes stall for
it. Otherwise it is a decode iteration. Blocks short during decodes: preemption by recompute of
the lowest-priority, newest request.
"""

from __future__ import annotations

from scheduler_service.policies.base import Policy, ScheduleOutput, SchedulerState
from scheduler_service.policies.steps import admit_whole, continue_prefills, schedule_decodes


class VllmPolicy(Policy):
    name = "vllm"

    def schedule(self, state: SchedulerState) -> ScheduleOutput:
        out = ScheduleOutput()
        admit_whole(state, out, self.config.token_budget, self.config.max_batch_size)
        if out.chunks:
            return out  # a prefill iteration: decodes wait
        schedule_decodes(state, out)
        # Whole prompts leave no partial prefills; this only guards the no-deadlock rule.
        continue_prefills(state, out, self.config.token_budget - len(out.chunks))
        return out

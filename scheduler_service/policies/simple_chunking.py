"""Chunked prefills without hybrid batches (the Sarathi-Serve paper's ablation).

Prompts are cut into chunks of the token budget as in `sarathi`, but an iteration holds either
prefill chunks or decodes, never both. When both kinds of work exist they take turns, one
iteration each, so decodes stall for one chunk at a time rather than a whole prompt.
"""

from __future__ import annotations

from scheduler_service.policies.base import Policy, PolicyConfig, ScheduleOutput, SchedulerState
from scheduler_service.policies.steps import (
    admit_chunked,
    continue_prefills,
    decodes_of,
    prefills_of,
    schedule_decodes,
)


class SimpleChunkingPolicy(Policy):
    name = "simple_chunking"

    def __init__(self, config: PolicyConfig) -> None:
        super().__init__(config)
        self._decode_turn = False

    def schedule(self, state: SchedulerState) -> ScheduleOutput:
        out = ScheduleOutput()
        has_decodes = bool(decodes_of(state))
        has_prefills = bool(state.waiting) or bool(prefills_of(state))
        if has_decodes and (self._decode_turn or not has_prefills):
            schedule_decodes(state, out)
            self._decode_turn = False
            return out
        budget = continue_prefills(state, out, self.config.token_budget)
        admit_chunked(state, out, budget, self.config.max_batch_size)
        self._decode_turn = True
        if not out.chunks and has_decodes:
            schedule_decodes(state, out)  # no prefill could run (no blocks): decodes do instead
            self._decode_turn = False
        return out

"""Sarathi-Serve's stall-free batching with chunked prefills.

Every iteration: all running decodes first (they never stall), then the partially prefilled
requests, then new ones, with prompts cut into chunks so the iteration stays within the token
budget. When blocks run out, the newest request is preempted by recompute.
"""

from __future__ import annotations

from scheduler_service.policies.base import Policy, ScheduleOutput, SchedulerState


class SarathiPolicy(Policy):
    name = "sarathi"

    def schedule(self, state: SchedulerState) -> ScheduleOutput:
        out = ScheduleOutput()
        budget = self.config.token_budget
        preempted_now: set[int] = set()

        # 1. Decodes, oldest first, each one token. Blocks run short -> preempt the newest.
        for req in [r for r in state.running if r.is_decoding]:
            if req not in state.running:
                continue  # preempted above to make room for an older decode
            if not state.make_room(req, req.num_computed_tokens + 1, out):
                preempted_now.update(r.seq_id for r in out.preempted)
                continue
            state.schedule_chunk(out, req, 1)
            budget -= 1
        preempted_now.update(r.seq_id for r in out.preempted)

        # 2. Partially prefilled requests continue, oldest first.
        for req in [r for r in state.running if not r.is_decoding]:
            if budget <= 0:
                break
            if req not in state.running:
                continue
            chunk = min(req.num_uncomputed_tokens, budget)
            # Take what fits; if not one block fits and nothing has run, make room (no deadlock).
            fits = state.blocks.max_tokens_allocatable(req.seq_id) - req.num_computed_tokens
            if fits <= 0 and not out.chunks:
                state.make_room(req, req.num_computed_tokens + chunk, out)
                preempted_now.update(r.seq_id for r in out.preempted)
                if req not in state.running:
                    continue
                fits = state.blocks.max_tokens_allocatable(req.seq_id) - req.num_computed_tokens
            chunk = min(chunk, fits)
            if chunk <= 0:
                continue
            state.schedule_chunk(out, req, chunk)
            budget -= chunk

        # 3. Admit waiting requests in order while budget, batch size and blocks allow.
        keep = state.blocks.watermark_blocks
        while state.waiting and budget > 0 and len(state.running) < self.config.max_batch_size:
            req = state.waiting[0]
            if req.seq_id in preempted_now:
                break  # it just lost its blocks; admitting it again now would thrash
            chunk = min(req.num_uncomputed_tokens, budget)
            fits = state.blocks.max_tokens_allocatable(req.seq_id, keep_free=keep)
            if not state.running and not out.chunks:
                fits = state.blocks.max_tokens_allocatable(req.seq_id)  # alone: may use all
            chunk = min(chunk, fits)
            if chunk <= 0:
                break
            state.admit(req)
            state.schedule_chunk(out, req, chunk)
            budget -= chunk
        return out

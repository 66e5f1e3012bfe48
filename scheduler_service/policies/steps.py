"""The moves policies are built from: decode the running, continue partial prefills, admit.

Each takes the state and the iteration being built (out) and returns what budget is left, so
that a policy reads as the order of its moves. Every move keeps the no-deadlock rule: when
nothing else has run this iteration, it makes room (by preemption) rather than give up.
"""

from __future__ import annotations

import sys

from scheduler_service.policies.base import ScheduleOutput, SchedulerState
from scheduler_service.request import RequestStatus


def decodes_of(state: SchedulerState) -> list:
    """Running requests with exactly one token to compute, oldest first."""
    return [r for r in state.running if r.is_decoding and r.can_generate_more]


def prefills_of(state: SchedulerState) -> list:
    """Running requests partway through their prompt (or their recompute), oldest first."""
    return [r for r in state.running if not r.is_decoding and r.num_uncomputed_tokens > 0]


def preempt_for_waiting_priority(state: SchedulerState, out: ScheduleOutput, max_tokens: int,
                                 whole: bool) -> None:
    """Before decodes claim their blocks: if the head of the queue outranks a running request
    and its first chunk (of at most max_tokens; whole: its whole prompt) would not fit, preempt
    lower-priority running requests to make room. Cached prefixes are not counted: this may
    preempt a little more than needed, never less."""
    if not state.waiting or not state.running:
        return
    head = state.waiting[0]
    if head.priority <= min(r.priority for r in state.running):
        return
    n = head.num_tokens if whole else min(head.num_tokens, max_tokens)
    state.preempt_for(head, n, out, keep_free=state.blocks.watermark_blocks, partial=not whole)


def schedule_decodes(state: SchedulerState, out: ScheduleOutput) -> int:
    """One token for every running decode, oldest first. When blocks run short the lowest
    priority, newest unscheduled request is preempted (possibly the decode itself). Returns the
    number of decodes scheduled."""
    count = 0
    for req in decodes_of(state):
        if req.status is not RequestStatus.RUNNING:
            continue  # preempted above to make room for an older decode
        if not state.make_room(req, req.num_computed_tokens + 1, out):
            continue
        state.schedule_chunk(out, req, 1)
        count += 1
    return count


def continue_prefills(state: SchedulerState, out: ScheduleOutput, budget: int) -> int:
    """The next chunk of every partially prefilled request, oldest first, within budget and the
    free blocks. Returns the budget left."""
    for req in prefills_of(state):
        if budget <= 0:
            break
        if req.status is not RequestStatus.RUNNING:
            continue
        chunk = min(req.num_uncomputed_tokens, budget)
        fits = state.blocks.max_tokens_allocatable(req.seq_id) - req.num_computed_tokens
        if fits <= 0 and not out.chunks:
            # Nothing runs yet and not one block is free: preempt to guarantee progress.
            state.make_room(req, req.num_computed_tokens + chunk, out)
            if req.status is not RequestStatus.RUNNING:
                continue
            fits = state.blocks.max_tokens_allocatable(req.seq_id) - req.num_computed_tokens
        chunk = min(chunk, fits)
        if chunk <= 0:
            continue
        state.schedule_chunk(out, req, chunk)
        budget -= chunk
    return budget


def _keep_free(state: SchedulerState, out: ScheduleOutput) -> int:
    """The watermark, unless the cache would otherwise sit idle: a request alone may use it all."""
    return 0 if not state.running and not out.chunks else state.blocks.watermark_blocks


def admit_chunked(state: SchedulerState, out: ScheduleOutput, budget: int,
                  max_batch_size: int) -> int:
    """Admits waiting requests in queue order with a first chunk each, while budget, batch size
    and blocks (less the watermark) allow. Returns the budget left."""
    while state.waiting and budget > 0 and len(state.running) < max_batch_size:
        req = state.waiting[0]
        if out.is_preempted(req):
            break  # it just lost its blocks; admitting it again now would thrash
        n = state.admit(req, out, budget, keep_free=_keep_free(state, out))
        if n == 0:
            break
        budget -= n
    return budget


def admit_whole(state: SchedulerState, out: ScheduleOutput, budget: int,
                max_batch_size: int) -> int:
    """Admits waiting requests in queue order with all their uncomputed tokens (no chunking),
    while they fit budget, batch size and blocks (less the watermark). The first prompt of the
    iteration is admitted even if it is longer than the budget: otherwise it never could be.
    Returns the budget left (negative after an oversized prompt)."""
    first = True
    while state.waiting and len(state.running) < max_batch_size and (first or budget > 0):
        req = state.waiting[0]
        if out.is_preempted(req):
            break
        limit = sys.maxsize if first else budget
        n = state.admit(req, out, limit, keep_free=_keep_free(state, out), whole=True)
        if n == 0:
            break
        budget -= n
        first = False
    return budget

"""The policy interface and the state a policy works on.

A policy is a pure decision over queue state and the block manager: no I/O, no proto, no tensor.
It may allocate blocks, admit and preempt (all through SchedulerState, which keeps queues and
blocks consistent) and returns which requests run how many tokens this iteration.

Queue order is priority order: waiting is sorted by priority, highest first, FIFO within a
priority; a preempted request goes back ahead of its priority's queue (it arrived earlier).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field

from scheduler_service.block_manager import BlockManager
from scheduler_service.policies.cost_model import IterationCostModel
from scheduler_service.policies.latency_model import IterationShape, LatencyTracker
from scheduler_service.request import Request, RequestStatus


@dataclass(frozen=True)
class PolicyConfig:
    token_budget: int = 512          # tokens per iteration (Sarathi's chunk size; vLLM's
                                     # max_num_batched_tokens for the whole-prompt policies)
    max_batch_size: int = 256        # sequences per iteration
    # sarathi_dynamic: the iteration time to stay within, and the model that predicts it.
    target_iteration_ms: float = 50.0
    cost_model: IterationCostModel = field(default_factory=IterationCostModel)
    min_chunk_size: int = 32         # sarathi_dynamic never shrinks a chunk below this
    # sarathi with an SLO: the P99 time-between-tokens target that sizes each iteration's prefill
    # from the fitted latency model (latency_model.py); token_budget stays the cap. None: off.
    tbt_slo_ms: float | None = None

    def __post_init__(self) -> None:
        if self.token_budget < 1 or self.max_batch_size < 1:
            raise ValueError("token budget and max batch size must be at least 1")
        if self.target_iteration_ms <= 0 or self.min_chunk_size < 1:
            raise ValueError("the iteration target and the smallest chunk must be positive")
        if self.tbt_slo_ms is not None and self.tbt_slo_ms <= 0:
            raise ValueError("the time-between-tokens target must be positive")


@dataclass
class ScheduledChunk:
    request: Request
    num_tokens: int
    new_blocks: list[int]


@dataclass
class ScheduleOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    swap_out: list[tuple[int, int]] = field(default_factory=list)   # (device, host) copies
    swap_in: list[tuple[int, int]] = field(default_factory=list)    # (host, device) copies
    _scheduled: set[int] = field(default_factory=set, repr=False)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    def scheduled_ids(self) -> set[int]:
        return self._scheduled

    def is_preempted(self, request: Request) -> bool:
        return any(r is request for r in self.preempted)

    def shape(self) -> IterationShape:
        """The iteration's shape for the latency model; valid until the scheduler advances the
        requests' computed tokens (right after the policy returns)."""
        prefill = attention = chunks = decodes = kv = 0
        for c in self.chunks:
            computed = c.request.num_computed_tokens
            if c.num_tokens == 1 and computed >= c.request.num_prompt_tokens:
                decodes += 1
                kv += computed + 1
            else:
                chunks += 1
                prefill += c.num_tokens
                attention += c.num_tokens * (computed + c.num_tokens)
        return IterationShape(prefill, attention, chunks, decodes, kv)


def _victim_order(request: Request, index: int) -> tuple[int, int]:
    """Who goes first when blocks run out: the lowest priority, then the newest admitted."""
    return (request.priority, -index)


@dataclass
class SchedulerState:
    """Queues and blocks. running is in admission order (the last is the newest)."""

    blocks: BlockManager
    waiting: deque[Request] = field(default_factory=deque)
    running: list[Request] = field(default_factory=list)

    # --- queues -----------------------------------------------------------------------------
    def enqueue(self, request: Request) -> None:
        """A new arrival: behind every waiting request of its priority or higher."""
        waiting = self.waiting
        if not waiting or waiting[-1].priority >= request.priority:
            waiting.append(request)
            return
        i = next(i for i, r in enumerate(waiting) if r.priority < request.priority)
        waiting.insert(i, request)

    def requeue(self, request: Request) -> None:
        """A preempted request: ahead of every waiting request of its priority or lower."""
        waiting = self.waiting
        i = next((i for i, r in enumerate(waiting) if r.priority <= request.priority), len(waiting))
        waiting.insert(i, request)

    # --- moves ------------------------------------------------------------------------------
    def schedule_chunk(self, out: ScheduleOutput, request: Request, num_tokens: int) -> None:
        """Allocates blocks for num_tokens more tokens of request and adds the chunk to out."""
        if request.seq_id in out._scheduled:
            raise RuntimeError(f"sequence {request.seq_id} scheduled twice in one iteration")
        new = self.blocks.allocate(request.seq_id, request.num_computed_tokens + num_tokens)
        out.chunks.append(ScheduledChunk(request, num_tokens, new))
        out._scheduled.add(request.seq_id)

    def admit(self, request: Request, out: ScheduleOutput, max_tokens: int, *,
              keep_free: int = 0, whole: bool = False) -> int:
        """Moves waiting request to running with a first chunk, reusing its swapped-out KV or
        its cached prefix.

        The chunk is min(uncomputed tokens, max_tokens, what fits leaving keep_free blocks); with
        whole, all its uncomputed tokens or nothing. When blocks fall short, lower-priority
        running requests that are not scheduled this iteration are preempted (lowest, newest
        first). Returns the chunk's tokens; 0 means not admitted, and nothing changed (but any
        preemption that could not help is not done either)."""
        blocks = self.blocks
        swapped = blocks.swapped_tokens(request.seq_id)
        if swapped:
            cached = self._allocate_swap_in(request, swapped, keep_free)
            if cached < 0:
                return 0
        else:
            cached = blocks.acquire_prefix(request)
        request.num_computed_tokens = cached
        uncomputed = request.num_uncomputed_tokens
        want = uncomputed if whole else min(uncomputed, max_tokens)
        if whole and uncomputed > max_tokens:
            want = 0
        n = self._fit(request, want, keep_free, whole, out) if want > 0 else 0
        if n <= 0:
            blocks.release(request.seq_id)  # give the prefix (or swap-in blocks) back
            request.num_computed_tokens = 0
            return 0
        self.waiting.remove(request)
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        if swapped:
            out.swap_in.extend(blocks.swap_in(request.seq_id))
        else:
            blocks.record_admission(cached, request.num_tokens)
        self.schedule_chunk(out, request, n)
        return n

    def _allocate_swap_in(self, request: Request, swapped: int, keep_free: int) -> int:
        """Device blocks for a swapped-out request's KV; returns how many of its tokens count
        as computed, or -1 if the blocks do not fit. The last known token is always computed
        again: a sample in flight when it was preempted is void, so it must be redrawn."""
        blocks = self.blocks
        num_host = len(blocks.host_tables[request.seq_id])
        if not blocks.can_allocate(request.seq_id, num_host * blocks.block_size, keep_free):
            return -1
        blocks.allocate(request.seq_id, num_host * blocks.block_size)
        known = request.num_prompt_tokens + len(request.output_token_ids)
        return min(swapped, known - 1)

    def _fit(self, request: Request, want: int, keep_free: int, whole: bool,
             out: ScheduleOutput) -> int:
        """Tokens of want that request (holding its prefix) can allocate, after preempting
        lower-priority requests if that lets more fit."""
        blocks = self.blocks
        base = request.num_computed_tokens
        self.preempt_for(request, base + want, out, keep_free=keep_free, partial=not whole)
        fits = blocks.max_tokens_allocatable(request.seq_id, keep_free) - base
        return want if fits >= want else (0 if whole else max(0, fits))

    def preempt_for(self, request: Request, num_tokens: int, out: ScheduleOutput, *,
                    keep_free: int = 0, partial: bool = False) -> None:
        """Preempts running requests of lower priority than request that are not scheduled
        this iteration (lowest priority, then newest, first) until request's table could grow
        to num_tokens leaving keep_free blocks. Unless partial (any room helps), nobody is
        preempted when all of them together would not free enough."""
        blocks = self.blocks

        def short() -> bool:
            return not blocks.can_allocate(request.seq_id, num_tokens, keep_free)

        if not short():
            return
        scheduled = out.scheduled_ids()
        victims = [(_victim_order(r, i), r) for i, r in enumerate(self.running)
                   if r.priority < request.priority and r.seq_id not in scheduled]
        if not victims:
            return
        if not partial:
            reclaimable = sum(blocks.num_exclusive_blocks(r.seq_id) for _, r in victims)
            missing = blocks.num_missing_blocks(request.seq_id, num_tokens)
            if blocks.num_free_blocks - keep_free + reclaimable < missing:
                return
        for _, victim in sorted(victims, key=lambda v: v[0]):
            self.preempt(victim, out)
            if not short():
                return

    def preempt(self, request: Request, out: ScheduleOutput) -> None:
        """Frees the request's device blocks and requeues it at the front of its priority: its
        KV goes to host blocks if they have room (swap), else it is recomputed later."""
        self.running.remove(request)
        if self.blocks.can_swap_out(request.seq_id):
            out.swap_out.extend(self.blocks.swap_out(request.seq_id, request.num_computed_tokens))
        else:
            self.blocks.release(request.seq_id)
        request.num_computed_tokens = 0
        request.num_pending_tokens = 0  # its in-flight sample, if any, is void: recompute makes it
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.requeue(request)
        out.preempted.append(request)

    def make_room(self, request: Request, num_tokens: int, out: ScheduleOutput) -> bool:
        """Preempts unscheduled running requests (lowest priority, then newest, first) until
        request can grow to hold num_tokens; may preempt request itself. True if request can
        now allocate."""
        if self.blocks.can_allocate(request.seq_id, num_tokens):
            return True
        scheduled = out.scheduled_ids()
        while not self.blocks.can_allocate(request.seq_id, num_tokens):
            victims = [(_victim_order(r, i), r) for i, r in enumerate(self.running)
                       if r.seq_id not in scheduled]
            if not victims:
                return False
            victim = min(victims, key=lambda v: v[0])[1]
            self.preempt(victim, out)
            if victim is request:
                return False
        return True


class Policy(ABC):
    name: str = ""

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config
        # With an SLO budget (tbt_slo_ms) the scheduler feeds it each iteration's measured device
        # time; the trace and metrics report its prediction error.
        self.latency = LatencyTracker()

    @abstractmethod
    def schedule(self, state: SchedulerState) -> ScheduleOutput:
        """Decides the next iteration. Must never schedule a request twice, and must make
        progress whenever anything is waiting or running (no deadlock)."""

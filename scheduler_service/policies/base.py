"""The policy interface and the state a policy works on.

A policy is a pure decision over queue state and the block manager: no I/O, no proto, no tensor.
It may allocate blocks and preempt (both through SchedulerState, which keeps queues and blocks
consistent) and returns which requests run how many tokens this iteration.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field

from scheduler_service.block_manager import BlockManager
from scheduler_service.request import Request, RequestStatus


@dataclass(frozen=True)
class PolicyConfig:
    token_budget: int = 512          # tokens per iteration (Sarathi's chunk size)
    max_batch_size: int = 128        # sequences per iteration

    def __post_init__(self) -> None:
        if self.token_budget < 1 or self.max_batch_size < 1:
            raise ValueError("token budget and max batch size must be at least 1")


@dataclass
class ScheduledChunk:
    request: Request
    num_tokens: int
    new_blocks: list[int]


@dataclass
class ScheduleOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    def scheduled_ids(self) -> set[int]:
        return {c.request.seq_id for c in self.chunks}


@dataclass
class SchedulerState:
    """Queues and blocks. running is in admission order (the last is the newest)."""

    blocks: BlockManager
    waiting: deque[Request] = field(default_factory=deque)
    running: list[Request] = field(default_factory=list)

    def schedule_chunk(self, out: ScheduleOutput, request: Request, num_tokens: int) -> None:
        """Allocates blocks for num_tokens more tokens of request and adds the chunk to out."""
        new = self.blocks.allocate(request.seq_id, request.num_computed_tokens + num_tokens)
        out.chunks.append(ScheduledChunk(request, num_tokens, new))

    def admit(self, request: Request) -> None:
        self.waiting.remove(request)
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def preempt(self, request: Request, out: ScheduleOutput) -> None:
        """Preemption by recompute: free the blocks, forget the KV, requeue at the front."""
        self.running.remove(request)
        self.blocks.free(request.seq_id)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.waiting.appendleft(request)
        out.preempted.append(request)

    def make_room(self, request: Request, num_tokens: int, out: ScheduleOutput) -> bool:
        """Preempts the newest unscheduled running requests until request can grow to hold
        num_tokens; may preempt request itself. True if request can now allocate."""
        scheduled = out.scheduled_ids()
        while not self.blocks.can_allocate(request.seq_id, num_tokens):
            victims = [r for r in self.running if r.seq_id not in scheduled]
            if not victims:
                return False
            victim = victims[-1]
            self.preempt(victim, out)
            if victim is request:
                return False
        return True


class Policy(ABC):
    name: str = ""

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config

    @abstractmethod
    def schedule(self, state: SchedulerState) -> ScheduleOutput:
        """Decides the next iteration. Must never schedule a request twice, and must make
        progress whenever anything is waiting or running (no deadlock)."""

"""One replica as the engine drives it: its worker link, its own scheduler (KV block manager
and policy) and the plans it has in flight. Each replica overlaps on its own: no replica's
device waits on another's scheduling or results."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from protos.batch_plan import BatchPlan, StepOutput
from scheduler_service.messages import RequestUpdate
from scheduler_service.request import Request
from scheduler_service.scheduler import Scheduler
from scheduler_service.trace import IterationRecord
from scheduler_service.worker_link import WorkerInfo, WorkerLink


@dataclass
class _InFlight:
    record: IterationRecord
    sent: float


@dataclass
class Replica:
    id: int                       # never reused: results of an earlier connection are void
    address: str
    link: WorkerLink
    info: WorkerInfo
    scheduler: Scheduler
    depth: int                    # plans in flight at once (overlap; pipeline stages)
    pipelined: bool
    draining: bool = False        # the worker is shutting down: nothing new is placed here
    in_flight: deque[_InFlight] = field(default_factory=deque)
    preemptions_total: int = 0

    @property
    def num_blocks(self) -> int:
        return self.scheduler.blocks.num_blocks

    def load(self) -> tuple[int, int]:
        """Placement order: fewest tokens still to compute or generate, then most free blocks."""
        tokens = sum(r.num_uncomputed_tokens + r.max_tokens - len(r.output_token_ids)
                     for r in self.scheduler.requests.values())
        return tokens, -self.scheduler.blocks.num_free_blocks

    def fits(self, request: Request) -> bool:
        return self.scheduler.blocks.blocks_for(request.max_num_tokens) <= self.num_blocks

    def can_send(self) -> bool:
        return self.scheduler.has_work() and len(self.in_flight) < self.depth

    def schedule_and_send(self) -> IterationRecord | None:
        """Schedules the next iteration and sends its plan; None when there is nothing to run."""
        sched = self.scheduler
        # A pipeline of P stages runs P micro-batches of disjoint sequences at once; one stage
        # runs plan N+1 (sharing sequences with plan N) right after plan N when overlapping.
        busy = frozenset(s for f in self.in_flight for s in f.record.seq_ids) if self.pipelined \
            else frozenset()
        start = time.monotonic()
        plan = sched.schedule(busy, self.depth if self.pipelined else 1)
        if plan.is_empty:
            return None
        scheduled = time.monotonic()
        self.link.send(plan)
        record = self._record(plan, start, scheduled - start)
        self.preemptions_total += record.num_preempted
        self.in_flight.append(_InFlight(record, time.monotonic()))
        return record

    def apply(self, result: StepOutput) -> tuple[IterationRecord, list[RequestUpdate]]:
        """Applies the result of the oldest plan in flight (results come back in order)."""
        flight = self.in_flight.popleft()
        record = flight.record
        if result.step_id != record.step_id:
            raise RuntimeError(f"replica {self.id}: result for step {result.step_id} arrived, "
                               f"expected {record.step_id}")
        updates = self.scheduler.update(result)
        now = time.monotonic()
        record.duration_s = now - record.start_s
        record.round_trip_s = now - flight.sent
        record.worker = result.timings
        return record, updates

    def oldest_sent(self) -> float | None:
        return self.in_flight[0].sent if self.in_flight else None

    def idle(self) -> bool:
        return not self.scheduler.requests and not self.in_flight

    def _record(self, plan: BatchPlan, start: float, schedule_s: float) -> IterationRecord:
        sched = self.scheduler
        assert sched.last_schedule is not None
        decode_ids, prefill_ids, decode_tokens, prefill_tokens = [], [], 0, 0
        for chunk in sched.last_schedule.chunks:
            req = chunk.request
            # A chunk of one token past the prompt is a decode.
            if chunk.num_tokens == 1 and req.num_computed_tokens > req.num_prompt_tokens:
                decode_ids.append(req.seq_id)
                decode_tokens += 1
            else:
                prefill_ids.append(req.seq_id)
                prefill_tokens += chunk.num_tokens
        return IterationRecord(
            step_id=plan.step_id, start_s=start, schedule_s=schedule_s,
            num_prefill_tokens=prefill_tokens, num_decode_tokens=decode_tokens,
            decode_seq_ids=decode_ids, prefill_seq_ids=prefill_ids,
            num_preempted=len(sched.last_schedule.preempted),
            kv_blocks_used=sched.blocks.num_used_blocks, num_waiting=len(sched.state.waiting),
            replica=self.id, predicted_ms=sched.last_predicted_ms,
            slo_margin=sched.policy.latency.margin.value if sched.policy.config.tbt_slo_ms else 0.0)


def restart_from_tokens(request: Request) -> Request:
    """The request as new, with the tokens its client already has: recomputing prompt + those
    tokens on any replica continues the stream exactly where it stopped (greedy: the same
    tokens), and nothing the client has seen is sent again."""
    return Request(seq_id=request.seq_id, prompt_token_ids=request.prompt_token_ids,
                   sampling=request.sampling, max_tokens=request.max_tokens,
                   stop_token_ids=request.stop_token_ids, priority=request.priority,
                   arrival_time=request.arrival_time, output_token_ids=list(request.output_token_ids),
                   first_scheduled_time=request.first_scheduled_time)

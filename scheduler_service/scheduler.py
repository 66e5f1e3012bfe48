"""The scheduler core: request bookkeeping around a policy, plans out, step results in.

schedule() asks the policy for the next iteration and encodes it as a BatchPlan with deltas
only: a request the worker has not seen travels in full once; afterwards only its counters and
new blocks. Computed-token counts advance at schedule time. update() applies a StepOutput:
appends tokens, runs stop checks, frees finished requests. No I/O here: the engine does that.
"""

from __future__ import annotations

import time
from dataclasses import replace

from protos.batch_plan import BatchPlan, NewSequence, StepOutput
from scheduler_service.block_manager import BlockManager
from scheduler_service.messages import RequestUpdate
from scheduler_service.policies import Policy, ScheduleOutput, SchedulerState
from scheduler_service.policies.latency_model import IterationShape
from scheduler_service.request import FinishReason, Request, RequestStatus


class CapacityError(ValueError):
    """The request could never fit the KV cache, even alone."""


class Scheduler:
    def __init__(self, policy: Policy, blocks: BlockManager) -> None:
        self.policy = policy
        self.state = SchedulerState(blocks)
        self.requests: dict[int, Request] = {}
        self._pending_drops: list[int] = []
        self._next_step_id = 1
        self.last_schedule: ScheduleOutput | None = None
        self.last_predicted_ms = 0.0   # the latency model's prediction for the last plan
        # Plans in flight whose measured device time will feed the latency model. Only an SLO
        # budget runs the model: its refits cost milliseconds of the engine loop's time.
        self._shapes: dict[int, tuple[IterationShape, float]] = {}
        self._predicting = policy.config.tbt_slo_ms is not None

    @property
    def blocks(self) -> BlockManager:
        return self.state.blocks

    def has_work(self) -> bool:
        return bool(self.state.waiting or self.state.running or self._pending_drops)

    def add(self, request: Request) -> None:
        needed = self.blocks.blocks_for(request.max_num_tokens)
        if needed > self.blocks.num_blocks:
            raise CapacityError(
                f"the request needs up to {request.max_num_tokens} tokens of KV cache "
                f"({needed} blocks) but the cache holds {self.blocks.num_blocks} blocks: "
                f"lower max_tokens or shorten the prompt")
        if request.seq_id in self.requests:
            raise ValueError(f"duplicate sequence id {request.seq_id}")
        self.requests[request.seq_id] = request
        self.state.enqueue(request)

    def abort(self, seq_id: int) -> bool:
        request = self.requests.get(seq_id)
        if request is None:
            return False
        self._finish(request, FinishReason.ABORT)
        return True

    def schedule(self, busy: frozenset[int] = frozenset(), stages: int = 1) -> BatchPlan:
        """busy: sequences in micro-batches still in flight in a pipeline; they are neither
        scheduled nor preempted (a sequence is never in two micro-batches). stages: a pipeline's
        stage count; each micro-batch takes at most its share of the running sequences, so
        that the next one has sequences to run while this one is in flight."""
        out = self._schedule_around(busy, stages) if busy or stages > 1 \
            else self.policy.schedule(self.state)
        self.last_schedule = out
        plan = BatchPlan(step_id=self._next_step_id, dropped_seq_ids=self._pending_drops)
        # The shape before the computed counts advance below; swaps add copies the model does
        # not know of, so those steps neither teach it nor count as its misses.
        if self._predicting:
            shape = out.shape()
            self.last_predicted_ms = self.policy.latency.predict_ms(shape)
            if not shape.is_empty and not out.swap_in and not out.swap_out:
                self._shapes[plan.step_id] = (shape, self.last_predicted_ms)
        self._pending_drops = []
        self._next_step_id += 1
        for device, host in out.swap_out:
            plan.swap_out_device_blocks.append(device)
            plan.swap_out_host_blocks.append(host)
        for host, device in out.swap_in:
            plan.swap_in_host_blocks.append(host)
            plan.swap_in_device_blocks.append(device)
        for request in out.preempted:
            if request.known_to_worker:
                plan.dropped_seq_ids.append(request.seq_id)
                request.known_to_worker = False
        now = time.monotonic()
        for chunk in out.chunks:
            req = chunk.request
            new_blocks = chunk.new_blocks
            if not req.known_to_worker:
                plan.new_sequences.append(NewSequence(
                    req.seq_id, req.all_token_ids, list(self.blocks.tables[req.seq_id]),
                    req.sampling, req.num_prompt_tokens, req.num_computed_tokens))
                req.known_to_worker = True
                req.registered_step = plan.step_id
                new_blocks = []  # the full table travelled with the sequence
            plan.schedule(req.seq_id, req.num_computed_tokens, chunk.num_tokens, new_blocks)
            req.num_computed_tokens += chunk.num_tokens
            self.blocks.cache_blocks(req)  # its newly full blocks may now be shared
            if req.num_computed_tokens == req.num_tokens:
                req.num_pending_tokens += 1  # this chunk reaches the end: the worker samples
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
        return plan

    def _schedule_around(self, busy: frozenset[int], stages: int):
        """Runs the policy on a view of the state without the busy sequences (and, in a
        pipeline, without those past this micro-batch's share), then puts them back in their
        admission order (ahead of anything admitted now)."""
        running = self.state.running
        share = -(-len(running) // stages)  # ceil: P micro-batches of near-equal size
        offered = [r for r in running if r.seq_id not in busy][:share]
        held = {id(r) for r in running} - {id(r) for r in offered}
        view = replace(self.state, running=offered)
        out = self.policy.schedule(view)
        kept = {id(r) for r in view.running}
        self.state.running = [r for r in running if id(r) in held or id(r) in kept] + \
            [r for r in view.running if all(r is not old for old in running)]
        return out

    def update(self, output: StepOutput) -> list[RequestUpdate]:
        measured = self._shapes.pop(output.step_id, None)
        if measured is not None and output.timings.device_ns > 0:
            shape, predicted = measured
            self.policy.latency.observe(shape, predicted, output.timings.device_ns / 1e6)
        updates = []
        for seq_id, token in zip(output.seq_ids, output.token_ids, strict=True):
            request = self.requests.get(seq_id)
            if (request is None or request.status is not RequestStatus.RUNNING
                    or output.step_id < request.registered_step):
                continue  # finished, aborted or preempted after the plan was sent: void
            request.num_pending_tokens -= 1
            request.output_token_ids.append(token)
            reason = request.check_stop()
            if reason is not None:
                self._finish(request, reason)
            delay = None
            if len(request.output_token_ids) == 1 and request.first_scheduled_time is not None:
                delay = max(0.0, request.first_scheduled_time - request.arrival_time)
            updates.append(RequestUpdate(seq_id, [token], reason, delay))
        return updates

    def _finish(self, request: Request, reason: FinishReason) -> None:
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        if request in self.state.running:
            self.state.running.remove(request)
        elif request in self.state.waiting:
            self.state.waiting.remove(request)
        self.blocks.free(request.seq_id)
        if request.known_to_worker:
            self._pending_drops.append(request.seq_id)
            request.known_to_worker = False
        del self.requests[request.seq_id]

"""The engine process: schedule, send the plan, take the result, update, emit.

It runs apart from the client-facing frontend so that streaming to many clients never delays
the GPU. The frontend talks to it over two ZeroMQ sockets (commands in, updates out) with the
messages of messages.py: this link is internal to the scheduler service.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections import deque
from dataclasses import dataclass, field

import zmq

from protos.batch_plan import BatchPlan
from sarathi_common.lifecycle import exit_with_parent
from scheduler_service.block_manager import CacheConfig
from scheduler_service.config import SchedulerConfig
from scheduler_service.kv_cache import make_block_manager
from scheduler_service.messages import (
    AbortRequest,
    AddRequest,
    Command,
    EngineFailed,
    EngineReady,
    EngineStats,
    Event,
    GetTrace,
    RequestRejected,
    StepUpdates,
    Trace,
    decode_command,
    encode,
)
from scheduler_service.policies import PolicyConfig, make_policy
from scheduler_service.request import Request
from scheduler_service.scheduler import CapacityError, Scheduler
from scheduler_service.trace import IterationRecord
from scheduler_service.worker_link import WorkerLink, WorkerUnavailable

log = logging.getLogger("sarathi.engine")


@dataclass(frozen=True)
class EngineConfig:
    worker_address: str
    command_address: str          # frontend -> engine (the frontend binds)
    update_address: str           # engine -> frontend
    policy: str = "sarathi"
    policy_config: PolicyConfig = field(default_factory=PolicyConfig)
    block_size: int = 16
    cache: CacheConfig = field(default_factory=CacheConfig)
    num_kv_blocks: int | None = None   # None: as many as the worker reports
    memory_fraction: float = 0.9
    worker_timeout_s: float = 600.0
    overlap: bool = True          # schedule and send plan N+1 while the worker runs plan N
    trace_length: int = 10000     # iterations kept in the per-iteration trace

    @classmethod
    def from_settings(cls, settings: SchedulerConfig, command_address: str,
                      update_address: str) -> EngineConfig:
        assert settings.worker is not None, "the engine needs a worker address"
        return cls(worker_address=settings.worker, command_address=command_address,
                   update_address=update_address, policy=settings.policy,
                   policy_config=settings.policy_config(), block_size=settings.block_size,
                   cache=settings.cache_config(), num_kv_blocks=settings.num_kv_blocks,
                   memory_fraction=settings.memory_fraction, overlap=settings.overlap)


@dataclass
class _InFlight:
    record: IterationRecord
    sent: float


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.zmq = zmq.Context()
        self.commands = self.zmq.socket(zmq.PULL)
        self.commands.connect(config.command_address)
        self.out = self.zmq.socket(zmq.PUSH)
        self.out.connect(config.update_address)
        self.link = WorkerLink(config.worker_address)
        self.scheduler: Scheduler | None = None
        self.trace: deque[IterationRecord] = deque(maxlen=config.trace_length)
        self.preemptions_total = 0
        self.pipeline_depth = 1

    def emit(self, msg: Event) -> None:
        self.out.send(encode(msg))

    def start(self) -> None:
        cfg = self.config
        self.link.wait_ready(cfg.worker_timeout_s)
        info = self.link.describe(cfg.block_size, cfg.memory_fraction, cfg.policy_config.token_budget)
        num_blocks = info.num_blocks_available
        if cfg.num_kv_blocks is not None:
            num_blocks = min(num_blocks, cfg.num_kv_blocks) if num_blocks else cfg.num_kv_blocks
        if num_blocks < 1:
            raise RuntimeError("the worker has no memory left for a KV cache: lower the model size "
                               "or raise --memory-fraction")
        self.link.init_cache(num_blocks, cfg.block_size, cfg.cache.num_host_blocks)
        self.pipeline_depth = max(1, info.pipeline_parallel_size)
        policy = make_policy(cfg.policy, cfg.policy_config)
        self.scheduler = Scheduler(policy, make_block_manager(num_blocks, cfg.block_size, cfg.cache))
        self.emit(EngineReady(
            model=info.model, max_model_len=info.max_model_len, vocab_size=info.vocab_size,
            eos_token_ids=list(info.eos_token_ids), block_size=cfg.block_size,
            num_kv_blocks=num_blocks, dtype=info.dtype, device=info.device))

    def run(self) -> None:
        """The loop. With overlap, plan N+1 is scheduled and sent while the worker runs plan N
        (its decodes refer to tokens not yet received); results are then read in order."""
        sched = self.scheduler
        assert sched is not None
        # A pipeline of P stages runs P micro-batches of disjoint sequences at once; one stage
        # runs plan N+1 (sharing sequences with plan N) right after plan N when overlapping.
        pipelined = self.pipeline_depth > 1
        depth = max(2 if self.config.overlap else 1, self.pipeline_depth)
        in_flight: deque[_InFlight] = deque()
        while True:
            self._drain_commands(block=not sched.has_work() and not in_flight)
            if sched.has_work() and len(in_flight) < depth:
                busy = frozenset(s for f in in_flight for s in f.record.seq_ids) if pipelined else frozenset()
                sent = self._schedule_and_send(busy)
                if sent is not None:
                    in_flight.append(sent)
                    if len(in_flight) < depth:
                        continue  # keep the worker's queue full before waiting on a result
            if in_flight:
                self._receive(in_flight.popleft())

    def _schedule_and_send(self, busy: frozenset[int]) -> _InFlight | None:
        sched = self.scheduler
        assert sched is not None
        start = time.monotonic()
        plan = sched.schedule(busy)
        if plan.is_empty:
            return None
        scheduled = time.monotonic()
        self.link.send(plan)
        record = self._record(plan, start, scheduled - start)
        self.preemptions_total += record.num_preempted
        return _InFlight(record, time.monotonic())

    def _receive(self, flight: _InFlight) -> None:
        sched = self.scheduler
        assert sched is not None
        result = self.link.receive()
        if result.step_id != flight.record.step_id:
            raise RuntimeError(f"result for step {result.step_id} arrived, expected {flight.record.step_id}")
        updates = sched.update(result)
        record = flight.record
        now = time.monotonic()
        record.duration_s = now - record.start_s
        record.round_trip_s = now - flight.sent
        record.worker = result.timings
        self.emit(StepUpdates(updates, EngineStats(
            iteration=record, num_running=len(sched.state.running), num_waiting=len(sched.state.waiting),
            kv_blocks_used=sched.blocks.num_used_blocks, kv_blocks_total=sched.blocks.num_blocks,
            preemptions_total=self.preemptions_total, **self._prefix_stats())))

    def _prefix_stats(self) -> dict[str, int]:
        stats = getattr(self.scheduler.blocks, "prefix_stats", None) if self.scheduler else None
        if stats is None:
            return {}
        return {"prefix_cache_query_tokens": stats.query_tokens, "prefix_cache_hit_tokens": stats.hit_tokens}

    def _record(self, plan: BatchPlan, start: float, schedule_s: float) -> IterationRecord:
        sched = self.scheduler
        assert sched is not None and sched.last_schedule is not None
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
        record = IterationRecord(
            step_id=plan.step_id, start_s=start, schedule_s=schedule_s,
            num_prefill_tokens=prefill_tokens, num_decode_tokens=decode_tokens,
            decode_seq_ids=decode_ids, prefill_seq_ids=prefill_ids,
            num_preempted=len(sched.last_schedule.preempted),
            kv_blocks_used=sched.blocks.num_used_blocks, num_waiting=len(sched.state.waiting))
        self.trace.append(record)
        return record

    def _drain_commands(self, block: bool) -> None:
        timeout = -1 if block else 0
        while self.commands.poll(timeout):
            self._handle(decode_command(self.commands.recv()))
            timeout = 0

    def _handle(self, msg: Command) -> None:
        sched = self.scheduler
        assert sched is not None
        if isinstance(msg, AddRequest):
            try:
                sched.add(Request(
                    seq_id=msg.seq_id, prompt_token_ids=msg.prompt_token_ids, sampling=msg.sampling,
                    max_tokens=msg.max_tokens, stop_token_ids=msg.stop_token_ids, priority=msg.priority,
                    arrival_time=msg.arrival_time))
            except CapacityError as e:
                self.emit(RequestRejected(msg.seq_id, str(e)))
        elif isinstance(msg, AbortRequest):
            sched.abort(msg.seq_id)
        elif isinstance(msg, GetTrace):
            self.emit(Trace(list(self.trace)))


def run_engine(config: EngineConfig, parent_pid: int) -> None:
    """Process entry point. Reports a fatal error to the frontend instead of dying silently."""
    exit_with_parent(parent_pid)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s engine %(levelname)s %(message)s")
    engine = Engine(config)
    try:
        engine.start()
        engine.run()
    except WorkerUnavailable as e:
        engine.emit(EngineFailed(str(e)))
    except Exception as e:  # noqa: BLE001 - anything else is a bug: tell the frontend, then die
        traceback.print_exc()
        engine.emit(EngineFailed(f"engine error: {e!r}"))
    finally:
        time.sleep(0.2)  # let the last message leave
        engine.link.close()

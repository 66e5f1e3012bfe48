"""The engine process: schedule, send the plan, take the result, update, emit.

It runs apart from the client-facing frontend so that streaming to many clients never delays
the GPU. The frontend talks to it over two ZeroMQ sockets (commands in, updates out) with
pickled dataclasses: this link is internal to the scheduler service.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections import deque
from dataclasses import dataclass, field

import zmq

from scheduler_service.block_manager import BlockManager
from scheduler_service.metrics import EngineStats
from scheduler_service.policies import PolicyConfig, make_policy
from scheduler_service.request import Request
from scheduler_service.scheduler import CapacityError, RequestUpdate, Scheduler
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
    num_kv_blocks: int | None = None   # None: as many as the worker reports
    memory_fraction: float = 0.9
    worker_timeout_s: float = 600.0
    trace_length: int = 10000     # iterations kept in the per-iteration trace


# --- messages between frontend and engine ------------------------------------------------
@dataclass
class AddRequest:
    request: Request


@dataclass
class AbortRequest:
    seq_id: int


@dataclass
class GetTrace:
    pass


@dataclass
class EngineReady:
    model: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int]
    block_size: int
    num_kv_blocks: int
    dtype: str
    device: str


@dataclass
class StepUpdates:
    updates: list[RequestUpdate]
    stats: EngineStats


@dataclass
class RequestRejected:
    seq_id: int
    message: str


@dataclass
class EngineFailed:
    message: str


@dataclass
class IterationRecord:
    """One iteration as the scheduler saw it (for tests, metrics and trace dumps)."""

    step_id: int
    start: float                  # monotonic seconds
    duration_s: float
    num_prefill_tokens: int
    num_decode_tokens: int
    decode_seq_ids: list[int]
    prefill_seq_ids: list[int]
    num_preempted: int
    kv_blocks_used: int
    num_waiting: int
    worker_forward_ns: int


@dataclass
class Trace:
    records: list[IterationRecord]


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

    def start(self) -> None:
        cfg = self.config
        self.link.wait_ready(cfg.worker_timeout_s)
        info = self.link.describe(cfg.block_size, cfg.memory_fraction)
        num_blocks = info.num_blocks_available
        if cfg.num_kv_blocks is not None:
            num_blocks = min(num_blocks, cfg.num_kv_blocks) if num_blocks else cfg.num_kv_blocks
        if num_blocks < 1:
            raise RuntimeError("the worker has no memory left for a KV cache: lower the model size "
                               "or raise --memory-fraction")
        self.link.init_cache(num_blocks, cfg.block_size)
        policy = make_policy(cfg.policy, cfg.policy_config)
        self.scheduler = Scheduler(policy, BlockManager(num_blocks, cfg.block_size))
        self.out.send_pyobj(EngineReady(
            model=info.model, max_model_len=info.max_model_len, vocab_size=info.vocab_size,
            eos_token_ids=list(info.eos_token_ids), block_size=cfg.block_size,
            num_kv_blocks=num_blocks, dtype=info.dtype, device=info.device))

    def run(self) -> None:
        assert self.scheduler is not None
        while True:
            self._drain_commands(block=not self.scheduler.has_work())
            if self.scheduler.has_work():
                self.step()

    def step(self) -> None:
        sched = self.scheduler
        assert sched is not None
        start = time.monotonic()
        plan = sched.schedule()
        if plan.is_empty:
            return
        result = self.link.step(plan)
        updates = sched.update(result)
        record = self._record(plan, start, result.timings.forward_ns)
        self.preemptions_total += record.num_preempted
        self.out.send_pyobj(StepUpdates(updates, EngineStats(
            num_running=len(sched.state.running), num_waiting=len(sched.state.waiting),
            kv_blocks_used=sched.blocks.num_used_blocks, kv_blocks_total=sched.blocks.num_blocks,
            preemptions_total=self.preemptions_total, iteration_s=record.duration_s,
            num_prefill_tokens=record.num_prefill_tokens, num_decode_tokens=record.num_decode_tokens)))

    def _record(self, plan, start: float, forward_ns: int) -> IterationRecord:
        sched = self.scheduler
        assert sched is not None and sched.last_schedule is not None
        decode_ids, prefill_ids, decode_tokens, prefill_tokens = [], [], 0, 0
        for chunk in sched.last_schedule.chunks:
            req = chunk.request
            # A chunk of one token at the end of the known tokens, after a prefill, is a decode.
            if chunk.num_tokens == 1 and req.num_computed_tokens > req.num_prompt_tokens:
                decode_ids.append(req.seq_id)
                decode_tokens += 1
            else:
                prefill_ids.append(req.seq_id)
                prefill_tokens += chunk.num_tokens
        record = IterationRecord(
            step_id=plan.step_id, start=start, duration_s=time.monotonic() - start,
            num_prefill_tokens=prefill_tokens, num_decode_tokens=decode_tokens,
            decode_seq_ids=decode_ids, prefill_seq_ids=prefill_ids,
            num_preempted=len(sched.last_schedule.preempted),
            kv_blocks_used=sched.blocks.num_used_blocks, num_waiting=len(sched.state.waiting),
            worker_forward_ns=forward_ns)
        self.trace.append(record)
        return record

    def _drain_commands(self, block: bool) -> None:
        timeout = -1 if block else 0
        while self.commands.poll(timeout):
            self._handle(self.commands.recv_pyobj())
            timeout = 0

    def _handle(self, msg: object) -> None:
        sched = self.scheduler
        assert sched is not None
        if isinstance(msg, AddRequest):
            try:
                sched.add(msg.request)
            except CapacityError as e:
                self.out.send_pyobj(RequestRejected(msg.request.seq_id, str(e)))
        elif isinstance(msg, AbortRequest):
            sched.abort(msg.seq_id)
        elif isinstance(msg, GetTrace):
            self.out.send_pyobj(Trace(list(self.trace)))


def run_engine(config: EngineConfig) -> None:
    """Process entry point. Reports a fatal error to the frontend instead of dying silently."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s engine %(levelname)s %(message)s")
    engine = Engine(config)
    try:
        engine.start()
        engine.run()
    except WorkerUnavailable as e:
        engine.out.send_pyobj(EngineFailed(str(e)))
    except Exception as e:  # noqa: BLE001 - anything else is a bug: tell the frontend, then die
        traceback.print_exc()
        engine.out.send_pyobj(EngineFailed(f"engine error: {e!r}"))
    finally:
        time.sleep(0.2)  # let the last message leave
        engine.link.close()

"""The engine process: place requests on replicas, schedule, send the plans, take the results,
update, emit.

It runs apart from the client-facing frontend so that streaming to many clients never delays
the GPU. The frontend talks to it over two ZeroMQ sockets (commands in, updates out) with the
messages of messages.py: this link is internal to the scheduler service.

Replicas come and go while it runs: workers named at start (--worker) are dialled, and again
after they are lost; workers that join (Membership.Join) are dialled once announced. A replica
whose stream breaks, or that returns no result within the step timeout, is dropped and its
requests restart elsewhere from prompt + the tokens their clients already have (or fail fast).
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field

import zmq

from protos.batch_plan import StepOutput
from sarathi_common.auth import InternalTLS
from sarathi_common.lifecycle import exit_with_parent
from scheduler_service.block_manager import CacheConfig
from scheduler_service.config import SchedulerConfig
from scheduler_service.ipc_dir import ipc_dir_of, remove_ipc_dir
from scheduler_service.kv_cache import make_block_manager
from scheduler_service.messages import (
    AbortRequest,
    AddRequest,
    AddWorker,
    EngineFailed,
    EngineReady,
    EngineStats,
    Event,
    GetTrace,
    ReplicasChanged,
    RequestFailed,
    RequestRejected,
    StepUpdates,
    Trace,
    decode_command,
    encode,
)
from scheduler_service.policies import PolicyConfig, make_policy
from scheduler_service.policies.latency_model import IterationShape
from scheduler_service.profile import profile_worker
from scheduler_service.replica import Replica, restart_from_tokens
from scheduler_service.request import Request
from scheduler_service.scheduler import CapacityError, Scheduler
from scheduler_service.trace import IterationRecord
from scheduler_service.worker_link import WorkerInfo, WorkerLink, WorkerUnavailable

log = logging.getLogger("sarathi.engine")
REDIAL_S = 1.0   # a named worker that is not there is tried again this often

@dataclass(frozen=True)
class EngineConfig:
    command_address: str          # frontend -> engine (the frontend binds)
    update_address: str           # engine -> frontend
    worker_addresses: tuple[str, ...] = ()   # dialled at start and after a loss
    policy: str = "sarathi"
    policy_config: PolicyConfig = field(default_factory=PolicyConfig)
    block_size: int = 16
    cache: CacheConfig = field(default_factory=CacheConfig)
    num_kv_blocks: int | None = None   # None: as many as the worker reports
    memory_fraction: float = 0.9
    worker_timeout_s: float = 600.0    # one dial: wait this long for the worker to answer
    overlap: bool = True          # schedule and send plan N+1 while the worker runs plan N
    trace_length: int = 10000     # iterations kept in the per-iteration trace
    step_timeout_s: float = 120.0      # no result for this long: the replica is lost
    replica_wait_s: float = 30.0       # a request with no replica to run on waits this long
    replay: bool = True                # a lost replica's requests restart elsewhere (else fail)
    internal_tls: InternalTLS | None = None   # mutual TLS to the workers
    worker_peer_name: str | None = None       # the name their certificates carry

    @classmethod
    def from_settings(cls, settings: SchedulerConfig, command_address: str,
                      update_address: str) -> EngineConfig:
        return cls(command_address=command_address, update_address=update_address,
                   worker_addresses=settings.worker_addresses(), policy=settings.policy,
                   policy_config=settings.policy_config(), block_size=settings.block_size,
                   cache=settings.cache_config(), num_kv_blocks=settings.num_kv_blocks,
                   memory_fraction=settings.memory_fraction, overlap=settings.overlap,
                   step_timeout_s=settings.step_timeout_seconds,
                   replica_wait_s=settings.replica_wait_seconds,
                   replay=settings.on_replica_loss == "replay",
                   internal_tls=settings.internal_tls(),
                   worker_peer_name=settings.internal_peer_name)


@dataclass
class _Unplaced:
    request: Request
    deadline: float


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.zmq = zmq.Context()
        self.commands = self.zmq.socket(zmq.PULL)
        self.commands.connect(config.command_address)
        self.out = self.zmq.socket(zmq.PUSH)
        self.out.connect(config.update_address)
        # Everything the loop reacts to arrives here: commands (from a reader thread), worker
        # results (one reader thread per replica) and replicas ready or failed to connect.
        self.inbox: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self.replicas: dict[int, Replica] = {}
        self.dialling: set[str] = set()
        self.placed: dict[int, int] = {}           # seq_id -> replica id
        self.unplaced: deque[_Unplaced] = deque()  # no replica to run on (yet)
        self.model: WorkerInfo | None = None       # the first replica's; later ones must match
        self.trace: deque[IterationRecord] = deque(maxlen=config.trace_length)
        self._next_replica = 1
        self._stopped = threading.Event()

    def emit(self, msg: Event) -> None:
        self.out.send(encode(msg))

    # --- membership ---------------------------------------------------------------------------
    def start(self) -> None:
        threading.Thread(target=self._read_commands, daemon=True, name="engine-commands").start()
        for address in self.config.worker_addresses:
            self._dial(address)

    def _dial(self, address: str, delay_s: float = 0.0) -> None:
        """Connects to a worker in the background (Describe can run a profiling forward)."""
        if address in self.dialling or any(r.address == address for r in self.replicas.values()):
            return
        self.dialling.add(address)
        threading.Thread(target=self._connect, args=(address, delay_s), daemon=True,
                         name=f"dial-{address}").start()

    def _connect(self, address: str, delay_s: float) -> None:
        cfg = self.config
        named = address in cfg.worker_addresses
        unprofiled = False
        self._stopped.wait(delay_s)
        while not self._stopped.is_set():
            link = WorkerLink(address, cfg.internal_tls, cfg.worker_peer_name)
            try:
                info = link.connect(cfg.worker_timeout_s if not named else REDIAL_S * 5, cfg.block_size,
                                    cfg.memory_fraction, cfg.policy_config.token_budget,
                                    cfg.num_kv_blocks, cfg.cache.num_host_blocks,
                                    cfg.policy_config.max_batch_size)
            except WorkerUnavailable as e:
                link.close()
                if named:   # a worker named at start is ours: keep trying until it is back
                    time.sleep(REDIAL_S)
                    continue
                self.inbox.put(("dial_failed", address, str(e), False))
                return
            except Exception as e:  # noqa: BLE001 - e.g. no memory for a KV cache: a setting to fix
                link.close()
                self.inbox.put(("dial_failed", address, str(e), True))
                return
            try:
                samples = [] if unprofiled else self._profile(link, info)
            except WorkerUnavailable as e:
                # The worker refused a dummy plan (its stream is over): dial again and let the
                # latency model learn from the first iterations served instead.
                log.warning("profiling the worker at %s failed (%s): the SLO budget starts "
                            "small and learns from the first iterations", address, e)
                link.close()
                unprofiled = True
                continue
            self.inbox.put(("ready", address, link, info, samples))
            return

    def _profile(self, link: WorkerLink, info: WorkerInfo) -> list[tuple[IterationShape, float]]:
        """With an SLO budget: the start-up profile that warm-starts the latency model (a
        pipeline's stages are not profiled: its model learns from the first iterations served)."""
        cfg = self.config
        if cfg.policy_config.tbt_slo_ms is None or info.pipeline_parallel_size > 1:
            return []
        pc = cfg.policy_config
        return profile_worker(link.run_now, block_size=cfg.block_size, num_blocks=info.num_blocks,
                              token_budget=pc.token_budget, max_batch_size=pc.max_batch_size,
                              max_model_len=info.max_model_len, vocab_size=info.vocab_size)

    def _add_replica(self, address: str, link: WorkerLink, info: WorkerInfo,
                     samples: list[tuple[IterationShape, float]]) -> None:
        self.dialling.discard(address)
        model = self.model
        if model is not None and (info.model, info.vocab_size) != (model.model, model.vocab_size):
            log.error("refusing the worker at %s: it serves %s, this scheduler %s", address, info.model,
                      self.model.model)
            link.close()
            return
        cfg = self.config
        replica = Replica(
            id=self._next_replica, address=address, link=link, info=info,
            scheduler=Scheduler(make_policy(cfg.policy, cfg.policy_config),
                                make_block_manager(info.num_blocks, cfg.block_size, cfg.cache)),
            depth=max(2 if cfg.overlap else 1, info.pipeline_parallel_size),
            pipelined=info.pipeline_parallel_size > 1)
        if samples:
            replica.scheduler.policy.latency.warm_start(samples)
            log.info("replica %s: latency model from %d profiled iterations, margin %.2f", address,
                     len(samples), replica.scheduler.policy.latency.margin.value)
        self._next_replica += 1
        self.replicas[replica.id] = replica
        rid = replica.id
        link.read_results(lambda item: self.inbox.put(("result", rid, item)))
        if self.model is None:
            self.model = info
            self.emit(EngineReady(
                model=info.model, max_model_len=info.max_model_len, vocab_size=info.vocab_size,
                eos_token_ids=list(info.eos_token_ids), block_size=cfg.block_size,
                num_kv_blocks=info.num_blocks, dtype=info.dtype, device=info.device))
        log.info("replica %d joined: %s, %d KV blocks", rid, address, info.num_blocks)
        self._membership("joined", replica)
        waiting, self.unplaced = self.unplaced, deque()
        for item in waiting:
            self._place(item.request, item.deadline)

    def _remove(self, replica: Replica, change: str, reason: str) -> None:
        """Drops a replica; its requests restart elsewhere (or fail, without replay)."""
        del self.replicas[replica.id]
        replica.link.close()
        moved = [r for r in replica.scheduler.requests.values()]
        for request in moved:
            self.placed.pop(request.seq_id, None)
            if self.config.replay:
                self._place(restart_from_tokens(request))
            else:
                self.emit(RequestFailed(request.seq_id, f"replica {replica.id} ({replica.address}) "
                                                        f"was lost: {reason}"))
        log.warning("replica %d (%s) %s: %s; %d requests %s", replica.id, replica.address, change, reason,
                    len(moved), "replayed" if self.config.replay else "failed")
        self._membership(change, replica, len(moved) if self.config.replay else 0, reason)
        if replica.address in self.config.worker_addresses:
            # A named worker is ours: once it is back (restarted, or a new pod at its address),
            # it serves again. A drained one is leaving now: try it a little later.
            self._dial(replica.address, delay_s=0.0 if change == "lost" else REDIAL_S)

    def _membership(self, change: str, replica: Replica, replayed: int = 0, reason: str = "") -> None:
        serving = [r for r in self.replicas.values() if not r.draining]
        self.emit(ReplicasChanged(change=change, replica=replica.id, address=replica.address,
                                  num_serving=len(serving), num_kv_blocks=sum(r.num_blocks for r in serving),
                                  num_replayed=replayed, reason=reason))

    def _start_drain(self, replica: Replica) -> None:
        replica.draining = True
        if any(not r.draining for r in self.replicas.values()):
            self._remove(replica, "drained", "the worker is shutting down; its requests moved")
        else:
            self._membership("draining", replica)
            self._finish_drain(replica)

    def _finish_drain(self, replica: Replica) -> None:
        if replica.draining and replica.idle() and replica.id in self.replicas:
            self._remove(replica, "drained", "the worker is shutting down")

    # --- placement ----------------------------------------------------------------------------
    def _place(self, request: Request, deadline: float | None = None) -> None:
        open_replicas = [r for r in self.replicas.values() if not r.draining]
        if not open_replicas:
            if deadline is None:
                deadline = time.monotonic() + self.config.replica_wait_s
            self.unplaced.append(_Unplaced(request, deadline))
            return
        fitting = [r for r in open_replicas if r.fits(request)]
        try:
            if not fitting:   # the largest replica says why it cannot hold the request
                max(open_replicas, key=lambda r: r.num_blocks).scheduler.add(request)
            replica = min(fitting, key=Replica.load)
            replica.scheduler.add(request)
        except CapacityError as e:
            self.emit(RequestRejected(request.seq_id, str(e)))
            return
        self.placed[request.seq_id] = replica.id

    def _abort(self, seq_id: int) -> None:
        rid = self.placed.pop(seq_id, None)
        if rid is not None and rid in self.replicas:
            replica = self.replicas[rid]
            replica.scheduler.abort(seq_id)
            self._finish_drain(replica)
            return
        self.unplaced = deque(u for u in self.unplaced if u.request.seq_id != seq_id)

    # --- the loop -----------------------------------------------------------------------------
    def run(self) -> None:
        """With overlap, each replica's plan N+1 is scheduled and sent while its worker runs
        plan N (its decodes refer to tokens not yet received); results are applied in order as
        they arrive, from whichever replica."""
        while True:
            for replica in list(self.replicas.values()):
                while replica.can_send() and replica.schedule_and_send() is not None:
                    pass
            item = self._next_item(self._wait_s())
            while item is not None:
                self._handle(item)
                item = self._next_item(0)
            self._expire()

    def _next_item(self, timeout: float | None) -> tuple | None:
        try:
            return self.inbox.get(timeout=timeout) if timeout != 0 else self.inbox.get_nowait()
        except queue.Empty:
            return None

    def _wait_s(self) -> float | None:
        """How long the loop may sleep: until the nearest step or waiting deadline."""
        deadlines = [r.oldest_sent() + self.config.step_timeout_s for r in self.replicas.values()
                     if r.in_flight]
        if self.unplaced:
            deadlines.append(min(u.deadline for u in self.unplaced))
        if not deadlines:
            return None
        return max(0.001, min(deadlines) - time.monotonic())

    def _expire(self) -> None:
        now = time.monotonic()
        for replica in list(self.replicas.values()):
            sent = replica.oldest_sent()
            if sent is not None and now - sent > self.config.step_timeout_s:
                self._remove(replica, "lost", f"no result within {self.config.step_timeout_s:g} s")
        if any(u.deadline <= now for u in self.unplaced):
            expired = [u for u in self.unplaced if u.deadline <= now]
            self.unplaced = deque(u for u in self.unplaced if u.deadline > now)
            for u in expired:
                self.emit(RequestFailed(u.request.seq_id, f"no replica came back within "
                                                          f"{self.config.replica_wait_s:g} s: retry later"))

    def _handle(self, item: tuple) -> None:
        kind = item[0]
        if kind == "result":
            _, rid, result = item
            replica = self.replicas.get(rid)
            if replica is None:
                return   # a replica already dropped: its results are void
            if isinstance(result, WorkerUnavailable):
                self._remove(replica, "lost", str(result))
            else:
                self._apply(replica, result)
        elif kind == "command":
            self._command(item[1])
        elif kind == "ready":
            self._add_replica(*item[1:])
        elif kind == "dial_failed":
            _, address, message, fatal = item
            self.dialling.discard(address)
            log.error("could not use the worker at %s: %s", address, message)
            if fatal and self.model is None and not self.replicas:
                raise RuntimeError(message)

    def _apply(self, replica: Replica, result: StepOutput) -> None:
        record, updates = replica.apply(result)
        self.trace.append(record)
        for update in updates:
            if update.finish_reason is not None:
                self.placed.pop(update.seq_id, None)
        self.emit(StepUpdates(updates, self._stats(record, replica)))
        if result.draining and not replica.draining:
            self._start_drain(replica)
        else:
            self._finish_drain(replica)

    def _stats(self, record: IterationRecord, replica: Replica) -> EngineStats:
        replicas = list(self.replicas.values())
        sched = replica.scheduler
        query = hit = 0
        for r in replicas:
            stats = getattr(r.scheduler.blocks, "prefix_stats", None)
            if stats is not None:
                query, hit = query + stats.query_tokens, hit + stats.hit_tokens
        return EngineStats(
            iteration=record,
            num_running=sum(len(r.scheduler.state.running) for r in replicas),
            num_waiting=sum(len(r.scheduler.state.waiting) for r in replicas) + len(self.unplaced),
            kv_blocks_used=sum(r.scheduler.blocks.num_used_blocks for r in replicas),
            kv_blocks_total=sum(r.num_blocks for r in replicas),
            preemptions_total=sum(r.preemptions_total for r in replicas),
            prefix_cache_query_tokens=query, prefix_cache_hit_tokens=hit,
            replica_running=len(sched.state.running), replica_waiting=len(sched.state.waiting),
            replica_kv_blocks_used=sched.blocks.num_used_blocks, replica_kv_blocks_total=replica.num_blocks)

    def _command(self, msg) -> None:
        if isinstance(msg, AddRequest):
            self._place(Request(
                seq_id=msg.seq_id, prompt_token_ids=msg.prompt_token_ids, sampling=msg.sampling,
                max_tokens=msg.max_tokens, stop_token_ids=msg.stop_token_ids, priority=msg.priority,
                arrival_time=msg.arrival_time, output_token_ids=list(msg.output_token_ids)))
        elif isinstance(msg, AbortRequest):
            self._abort(msg.seq_id)
        elif isinstance(msg, GetTrace):
            self.emit(Trace(sorted(self.trace, key=lambda r: r.start_s)))
        elif isinstance(msg, AddWorker):
            self._dial(msg.address)

    def _read_commands(self) -> None:
        while True:
            self.inbox.put(("command", decode_command(self.commands.recv())))

    def close(self) -> None:
        self._stopped.set()
        for replica in self.replicas.values():
            replica.link.close()


def run_engine(config: EngineConfig, parent_pid: int) -> None:
    """Process entry point. Reports a fatal error to the frontend instead of dying silently."""
    def orphaned(*_) -> None:   # the frontend died without removing its socket folder
        remove_ipc_dir(ipc_dir_of(config.update_address))
        os._exit(128 + signal.SIGTERM)

    # Its own signal for the frontend's death, apart from the SIGTERM of a frontend that closes
    # (and removes the folder itself, or restarts an engine in it).
    signal.signal(signal.SIGUSR1, orphaned)
    exit_with_parent(parent_pid, signal.SIGUSR1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the frontend's to handle (it drains)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s engine %(levelname)s %(message)s")
    engine = Engine(config)
    try:
        engine.start()
        engine.run()
    except Exception as e:  # noqa: BLE001 - anything else is a bug: tell the frontend, then die
        traceback.print_exc()
        engine.emit(EngineFailed(f"engine error: {e!r}" if not isinstance(e, RuntimeError) else str(e)))
    finally:
        time.sleep(0.2)  # let the last message leave
        engine.close()

"""The frontend's side of the engine: starts the engine process, sends it commands, routes its
events to the Generate calls waiting on them, and restarts it if it dies.

A restarted engine knows nothing: the frontend gives it back the workers that joined and every
stream still open, each with the tokens its client already has, so the streams continue after a
pause. Commands go through a fresh socket per engine, so nothing meant for the dead one reaches
the new one twice.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from scheduler_service.config import SchedulerConfig
from scheduler_service.engine import EngineConfig, run_engine
from scheduler_service.ipc_dir import make_ipc_dir, remove_ipc_dir
from scheduler_service.messages import (
    AddRequest,
    AddWorker,
    Command,
    EngineFailed,
    EngineReady,
    GetTrace,
    ReplicasChanged,
    RequestFailed,
    RequestRejected,
    StepUpdates,
    Trace,
    decode_event,
    encode,
)
from scheduler_service.metrics import ServerMetrics

log = logging.getLogger("sarathi.frontend")
MAX_RESTARTS = 3            # engine deaths within RESTART_WINDOW_S before the scheduler gives up
RESTART_WINDOW_S = 60.0


@dataclass
class Stream:
    """One open Generate call: its mailbox, what it asked for, and the tokens it has received."""

    request: AddRequest
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    tokens: list[int] = field(default_factory=list)


class EngineClient:
    def __init__(self, settings: SchedulerConfig, metrics: ServerMetrics,
                 on_health: Callable[[bool], None] = lambda _: None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.on_health = on_health   # called with whether a replica takes requests, on change
        self._dir = make_ipc_dir()
        self.ctx = zmq.asyncio.Context()
        self.update_address = f"ipc://{self._dir}/updates"
        self.updates = self.ctx.socket(zmq.PULL)
        self.updates.bind(self.update_address)
        # Commands go out through a plain socket: its non-blocking send says at once whether the
        # message left (an asyncio socket's send only returns a future).
        self.command_ctx = zmq.Context()
        self.commands: zmq.Socket | None = None
        self.process: multiprocessing.Process | None = None
        self.streams: dict[int, Stream] = {}
        self.joined: set[str] = set()            # workers that announced themselves
        self.ready: EngineReady | None = None    # the model, from the first replica ever
        self.num_serving = 0
        self.num_kv_blocks = 0
        self.fatal: str | None = None            # set when the scheduler cannot serve any more
        self.fatal_event = asyncio.Event()
        self._restarts: list[float] = []
        self._incarnation = 0
        self._trace_waiters: list[asyncio.Future] = []
        self._unsent: list[bytes] = []           # commands waiting for the engine to connect

    # --- the engine process -----------------------------------------------------------------------
    def start(self) -> None:
        """A new engine process with a fresh command socket."""
        if self.commands is not None:
            self.commands.close(linger=0)   # drops what the dead engine never read
        self._unsent.clear()
        self._incarnation += 1
        command_address = f"ipc://{self._dir}/commands-{self._incarnation}"
        self.commands = self.command_ctx.socket(zmq.PUSH)
        self.commands.bind(command_address)
        config = EngineConfig.from_settings(self.settings, command_address, self.update_address)
        self.process = multiprocessing.get_context("spawn").Process(
            target=run_engine, args=(config, os.getpid()), name="sarathi-engine", daemon=True)
        self.process.start()

    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def _restart(self, why: str) -> None:
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW_S] + [now]
        self._set_serving(0, self.num_kv_blocks)
        if self.ready is None or len(self._restarts) > MAX_RESTARTS:
            # Never served (a setting is wrong), or it keeps dying: let the supervisor decide.
            self._fail(why)
            return
        log.error("%s: restarting the engine; %d open streams continue once a replica is back",
                  why, len(self.streams))
        self.metrics.engine_restarts.inc()
        self.start()
        for address in sorted(self.joined):
            self.send_nowait(AddWorker(address))
        for seq_id, stream in self.streams.items():
            r = stream.request
            self.send_nowait(AddRequest(
                seq_id=seq_id, prompt_token_ids=r.prompt_token_ids, sampling=r.sampling,
                max_tokens=r.max_tokens, stop_token_ids=r.stop_token_ids, priority=r.priority,
                arrival_time=r.arrival_time, output_token_ids=list(stream.tokens)))

    def close(self) -> None:
        if self.process is not None and self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        self.ctx.destroy(linger=0)
        self.command_ctx.destroy(linger=0)
        remove_ipc_dir(self._dir)

    # --- commands ---------------------------------------------------------------------------------
    def send_nowait(self, msg: Command) -> None:
        """Never waits: a bound PUSH socket with no engine connected (starting, or dead) would
        block its caller for good (the hang of a SIGTERM with streams in flight). What cannot
        leave now waits, in order, until the engine connects (read_events sends it)."""
        self._unsent.append(encode(msg))
        self._flush()

    def _flush(self) -> None:
        assert self.commands is not None
        while self._unsent:
            try:
                self.commands.send(self._unsent[0], flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            self._unsent.pop(0)

    def add_stream(self, request: AddRequest) -> Stream:
        stream = Stream(request)
        self.streams[request.seq_id] = stream
        self.send_nowait(request)
        return stream

    async def trace(self) -> Trace:
        fut = asyncio.get_running_loop().create_future()
        self._trace_waiters.append(fut)
        self.send_nowait(GetTrace())
        return await fut

    # --- events -----------------------------------------------------------------------------------
    async def read_events(self, poll_ms: int = 250) -> None:
        """Routes the engine's events; between them, checks that the engine lives."""
        while True:
            self._flush()
            if await self.updates.poll(20 if self._unsent else poll_ms):
                self._route(decode_event(await self.updates.recv()))
            elif not self.alive() and self.fatal is None:
                # Every event the dead engine sent is read first: a token it streamed must be
                # among those the new engine is told the client has.
                while await self.updates.poll(0):
                    self._route(decode_event(await self.updates.recv()))
                code = self.process.exitcode if self.process is not None else None
                self._restart(f"the engine process exited with code {code}")

    def _route(self, msg) -> None:
        if isinstance(msg, StepUpdates):
            self.metrics.observe_engine(msg.stats)
            for upd in msg.updates:
                stream = self.streams.get(upd.seq_id)
                if stream is not None:
                    stream.tokens.extend(upd.new_token_ids)
                    stream.queue.put_nowait(upd)
        elif isinstance(msg, RequestRejected | RequestFailed):
            stream = self.streams.get(msg.seq_id)
            if stream is not None:
                stream.queue.put_nowait(msg)
        elif isinstance(msg, ReplicasChanged):
            log.info("replica %d (%s) %s%s; %d serving, %d KV blocks%s", msg.replica, msg.address,
                     msg.change, f" ({msg.reason})" if msg.reason else "", msg.num_serving,
                     msg.num_kv_blocks, f"; {msg.num_replayed} requests moved" if msg.num_replayed else "")
            self.metrics.observe_replicas(msg)
            self._set_serving(msg.num_serving, msg.num_kv_blocks)
        elif isinstance(msg, EngineReady):
            if self.ready is None:
                self.ready = msg
        elif isinstance(msg, EngineFailed):
            log.error("engine failed: %s", msg.message)
            if self.ready is None:   # never served: a setting is wrong, nothing to restart for
                self._fail(msg.message)
        elif isinstance(msg, Trace):
            while self._trace_waiters:
                fut = self._trace_waiters.pop(0)
                if not fut.done():
                    fut.set_result(msg)

    def _fail(self, why: str) -> None:
        self.fatal = why
        self.fatal_event.set()
        for stream in self.streams.values():
            stream.queue.put_nowait(EngineFailed(why))

    def _set_serving(self, num_serving: int, num_kv_blocks: int) -> None:
        changed = (num_serving > 0) != (self.num_serving > 0)
        self.num_serving, self.num_kv_blocks = num_serving, num_kv_blocks
        if changed:
            self.on_health(num_serving > 0)

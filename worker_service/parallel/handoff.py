"""ZeroMQ inside a replica: plan bytes to every rank, hidden states stage to stage, sampled
tokens back to rank 0, and heartbeats so that a dead process brings the replica down fast.

Every rank binds one PULL socket (its layout address). A receiver thread reads it and routes
each message by kind into a queue, so the main thread never polls; the same thread sends a
heartbeat to every peer each HEARTBEAT_S and ends the process when a peer falls silent for
PEER_TIMEOUT_S: a replica with a dead rank cannot compute anything (its collectives and
handoffs would wait forever), so failing fast and visibly is the only useful behaviour. Rank 0
then drops its gRPC stream, and the scheduler reports UNAVAILABLE.

Messages are multipart: [kind, sender rank, ...]. Tensors travel as raw bytes with a small
header (dtype, shape); plan and result bytes travel exactly as protobuf encoded them.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import warnings
from dataclasses import dataclass

import torch
import zmq

from worker_service.parallel.curve import PLAINTEXT, LinkSecurity
from worker_service.parallel.layout import ReplicaLayout

log = logging.getLogger("sarathi.replica")

HEARTBEAT_S = 0.5
PEER_TIMEOUT_S = float(os.environ.get("SARATHI_PEER_TIMEOUT_S", "5"))
STARTUP_TIMEOUT_S = 900.0      # a peer never heard from (loading weights) within this is lost

PLAN, INIT, RESET, STOP = b"plan", b"init", b"reset", b"stop"   # control, rank 0 -> all
HIDDEN = b"hidden"                                              # stage s -> stage s + 1
RESULT, ERROR = b"result", b"error"                             # -> rank 0
STATS_REQUEST, STATS_REPLY = b"stats?", b"stats"                # traffic counters, for benchmarks
MEMORY_REQUEST, MEMORY_REPLY = b"mem?", b"mem"                  # each rank's KV budget, at start
HEARTBEAT = b"hb"


@dataclass
class HandoffStats:
    """What this process moved over ZeroMQ (heartbeats excluded), for the benchmark."""

    messages: int = 0
    bytes: int = 0
    send_ns: int = 0          # serialising and queueing sends
    wait_ns: int = 0          # blocked waiting for a hidden state or a result
    transit_ns: int = 0       # hidden states: sent until our receiver thread had them (one host)
    unpack_ns: int = 0        # hidden states: bytes back into tensors

    def reset(self) -> None:
        self.messages = self.bytes = self.send_ns = self.wait_ns = self.transit_ns = self.unpack_ns = 0


STATS = HandoffStats()


def _dtype_name(dtype: torch.dtype) -> bytes:
    return str(dtype).removeprefix("torch.").encode()


def tensor_frames(t: torch.Tensor) -> list:
    t = t.detach().contiguous().cpu()
    header = _dtype_name(t.dtype) + b":" + ",".join(map(str, t.shape)).encode()
    return [header, t.view(-1).view(torch.uint8).numpy()]


def frames_tensor(header: bytes, data, device: torch.device) -> torch.Tensor:
    name, shape = header.split(b":")
    dims = [int(s) for s in shape.split(b",")] if shape else []
    with warnings.catch_warnings():   # the frame is read-only; we copy it before use
        warnings.simplefilter("ignore")
        flat = torch.frombuffer(memoryview(data), dtype=getattr(torch, name.decode()))
    return flat.view(dims).to(device, copy=True)


class Mailbox:
    """This rank's inbox and its peers' liveness. Queues: control (from rank 0, in order),
    hidden (from the previous stage, in step order), results (rank 0 only)."""

    def __init__(self, layout: ReplicaLayout, rank: int, security: LinkSecurity = PLAINTEXT) -> None:
        self.layout, self.rank, self.security = layout, rank, security
        self.control: queue.SimpleQueue[list[bytes]] = queue.SimpleQueue()
        self.hidden: queue.SimpleQueue[list] = queue.SimpleQueue()
        self.results: queue.SimpleQueue[list[bytes]] = queue.SimpleQueue()
        key = security.key
        # With CURVE, a context of its own: its ZAP handler then answers for this mailbox alone.
        self.ctx = zmq.Context() if key else zmq.Context.instance()
        self._auth = key.authenticator(self.ctx) if key else None
        self._pull = self.ctx.socket(zmq.PULL)
        if key:
            key.serve(self._pull)
        self._pull.bind(security.bind_address(layout.addresses[rank]))
        self._started = time.monotonic()
        self.last_heard: dict[int, float] = {}
        self.ready_peers: set[int] = set()
        self._ready = False
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"mailbox-{rank}", daemon=True)
        self._thread.start()

    def wait_for_peers(self, timeout: float) -> None:
        """Declares this rank ready (its shard is built) and returns once every peer has said the
        same. Until a peer is ready, only STARTUP_TIMEOUT_S of silence counts as lost: loading
        weights or joining the gloo group may starve the heartbeat thread on a busy host."""
        self._ready = True
        deadline = time.monotonic() + timeout
        peers = set(range(self.layout.world_size)) - {self.rank}
        while not peers <= self.ready_peers:
            if time.monotonic() > deadline:
                missing = sorted(peers - self.ready_peers)
                raise TimeoutError(f"replica ranks {missing} were not ready within {timeout:.0f} s")
            time.sleep(0.05)

    def _run(self) -> None:
        beats = {}
        for peer in range(self.layout.world_size):
            if peer != self.rank:
                s = self.ctx.socket(zmq.PUSH)
                s.setsockopt(zmq.SNDHWM, 4)       # a dead peer's queue stays tiny
                s.setsockopt(zmq.LINGER, 0)
                self.connect(s, peer)
                beats[peer] = s
        me = str(self.rank).encode()
        poller = zmq.Poller()
        poller.register(self._pull, zmq.POLLIN)
        next_beat = 0.0
        while not self._closing.is_set():
            now = time.monotonic()
            if now >= next_beat:
                for s in beats.values():
                    try:
                        s.send_multipart([HEARTBEAT, me, b"1" if self._ready else b"0"], zmq.NOBLOCK)
                    except zmq.Again:
                        pass
                next_beat = now + HEARTBEAT_S
                self._check_peers(now)
            if poller.poll(timeout=HEARTBEAT_S * 1000 / 2):
                while True:
                    try:
                        msg = self._pull.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._route(msg)
        for s in beats.values():
            s.close()
        self._pull.close(linger=0)

    def connect(self, socket: zmq.Socket, peer: int) -> None:
        """Connects a sending socket to `peer`'s mailbox (as a CURVE client, with CURVE)."""
        if self.security.key:
            self.security.key.connect(socket)
        socket.connect(self.layout.endpoint(peer))

    def close(self) -> None:
        """Stops listening and watching peers (a replica shutting down in order)."""
        self._closing.set()
        self._thread.join(5)
        if self._auth is not None:
            self._auth.stop()

    def _route(self, msg: list) -> None:
        kind, sender = msg[0].bytes, int(msg[1].bytes)
        self.last_heard[sender] = time.monotonic()
        if kind == HEARTBEAT:
            if msg[2].bytes == b"1":
                self.ready_peers.add(sender)
            return
        if kind == HIDDEN:
            self.hidden.put([time.monotonic_ns(), *msg[2:]])
        elif kind in (RESULT, ERROR, STATS_REPLY, MEMORY_REPLY):
            self.results.put([kind] + [f.bytes for f in msg[2:]])
        else:
            self.control.put([kind] + [f.bytes for f in msg[2:]])

    def _check_peers(self, now: float) -> None:
        for peer in range(self.layout.world_size):
            if peer == self.rank:
                continue
            heard = self.last_heard.get(peer)
            silent = now - (heard if heard is not None else self._started)
            limit = PEER_TIMEOUT_S if peer in self.ready_peers else STARTUP_TIMEOUT_S
            if silent > limit:
                log.error("rank %d: replica rank %d (%s) silent for %.1f s: exiting", self.rank, peer,
                          self.layout.addresses[peer], silent)
                os._exit(3)


class Outbox:
    """Sends from the main thread (ZeroMQ sockets are not shared across threads)."""

    def __init__(self, layout: ReplicaLayout, rank: int, mailbox: Mailbox) -> None:
        self.layout, self.rank, self.mailbox = layout, rank, mailbox
        self._me = str(rank).encode()
        self._sockets: dict[int, zmq.Socket] = {}

    def _socket(self, peer: int) -> zmq.Socket:
        s = self._sockets.get(peer)
        if s is None:
            s = self.mailbox.ctx.socket(zmq.PUSH)
            s.setsockopt(zmq.LINGER, 1000)
            self.mailbox.connect(s, peer)
            self._sockets[peer] = s
        return s

    def send(self, peer: int, kind: bytes, *frames) -> None:
        start = time.perf_counter_ns()
        self._socket(peer).send_multipart([kind, self._me, *frames], copy=False)
        STATS.messages += 1
        STATS.bytes += sum(len(memoryview(f).cast("B")) for f in frames)
        STATS.send_ns += time.perf_counter_ns() - start

    def broadcast(self, kind: bytes, *frames) -> None:
        for peer in range(self.layout.world_size):
            if peer != self.rank:
                self.send(peer, kind, *frames)

    # --- the stage-to-stage link (pipeline.HiddenLink) ----------------------------------------
    def send_hidden(self, step_id: int, x: torch.Tensor, residual: torch.Tensor) -> None:
        stage, tp_rank = self.layout.stage_of(self.rank), self.layout.tp_rank_of(self.rank)
        # Every TP rank of a stage holds the same (all-reduced) hidden states, so each feeds its
        # counterpart in the next stage: no broadcast needed there.
        peer = self.layout.rank_of(stage + 1, tp_rank)
        # The send time rides along so that the receiver can measure transit (same host only:
        # the monotonic clock is shared by processes of one machine, not across machines).
        self.send(peer, HIDDEN, str(step_id).encode(), str(time.monotonic_ns()).encode(),
                  *tensor_frames(x), *tensor_frames(residual))

    def recv_hidden(self, step_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        start = time.perf_counter_ns()
        arrived, *frames = self.mailbox.hidden.get()
        unpack_start = time.perf_counter_ns()
        STATS.wait_ns += unpack_start - start
        got = int(frames[0].bytes)
        if got != step_id:
            raise RuntimeError(f"rank {self.rank}: hidden states of step {got} arrived for step {step_id}")
        STATS.transit_ns += arrived - int(frames[1].bytes)
        x = frames_tensor(frames[2].bytes, frames[3].buffer, device)
        residual = frames_tensor(frames[4].bytes, frames[5].buffer, device)
        STATS.unpack_ns += time.perf_counter_ns() - unpack_start
        return x, residual

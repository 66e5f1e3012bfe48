"""The worker's gRPC service: Describe, InitCache and the Step stream around an executor
(executor.py), a single-process ModelRunner or a parallel replica's ReplicaDriver.

Step moves bytes: plans reach the executor as they arrived (a replica forwards them to its other
ranks unparsed) and results leave as the executor serialized them.

A worker serves one scheduler at a time: the first caller of InitCache or Step attaches (named by
its certificate under internal mutual TLS, else by its connection); any other caller's InitCache
or Step gets FAILED_PRECONDITION until the attached scheduler's stream ends, or until it let
ATTACH_GRACE_S pass after InitCache without opening one. The attached scheduler calling again
(reconnected, restarted: the same certificate) replaces its own open stream.
"""

from __future__ import annotations

import logging
import queue
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
import torch
from google.protobuf.message import DecodeError

from protos import worker_pb2, worker_pb2_grpc
from sarathi_common.auth import InternalTLS, caller_identity
from sarathi_common.lifecycle import exit_now
from sarathi_common.net import listen
from worker_service import memory
from worker_service.compile_watch import watch_triton_compiles
from worker_service.config import JOIN_INTERVAL_S, WorkerConfig
from worker_service.executor import Executor, ExecutorBroken, PlanError

log = logging.getLogger("sarathi.worker")

GRPC_OPTIONS = [("grpc.max_send_message_length", 256 << 20),
                ("grpc.max_receive_message_length", 256 << 20),
                # The scheduler pings to find a vanished host (worker_link.py): take its pings
                # (gRPC's default answers them with GOAWAY "too_many_pings" and a broken stream).
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
                ("grpc.http2.max_ping_strikes", 0),
                # A port in use fails to bind rather than being shared with the other server.
                ("grpc.so_reuseport", 0)]
SERVICE = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name
BROKEN_EXIT_CODE = 4
BROKEN_EXIT_DELAY_S = 0.5   # for the UNAVAILABLE status to reach the scheduler first
MAX_BLOCK_SIZE = 1024   # tokens per KV block InitCache accepts
IDLE_S = 0.5   # draining: no plan for this long and none in flight, the scheduler has no work here
# A unary call's request must arrive within this: gRPC's sync server waits for it on a pool
# thread, forever when the client set no deadline (a few such calls would take every thread).
REQUEST_WAIT_S = 5.0
THREADS = 8                    # the Step stream takes one for its whole life
MAX_CONCURRENT_RPCS = 32       # beyond: RESOURCE_EXHAUSTED at once rather than a growing queue
ATTACH_GRACE_S = 30.0          # InitCache without a Step stream holds the worker this long
HANDOVER_S = 30.0              # the attached scheduler's previous stream is given this to end


# StepResult field 5 (`draining`), true, as encoded bytes. Protobuf merges concatenated messages,
# so appending it to a result the executor serialized marks that result without parsing it.
_DRAINING_FIELD = b"\x28\x01"


@dataclass
class _Attachment:
    """The scheduler this worker serves: who, since when, and its open Step stream (its
    servicer context, to end it when the same scheduler comes back), if any."""

    caller: str
    since: float
    stream: Any = None


class WorkerService:
    def __init__(self, executor: Executor[Any], weight_bytes: int, cpu_cache_limit: int) -> None:
        self.executor = executor
        self.weight_bytes = weight_bytes
        self.cpu_cache_limit = cpu_cache_limit
        self._stream_lock = threading.Lock()  # held by the Step stream, and by InitCache
        self._attach_lock = threading.Lock()  # guards `attached`
        self.attached: _Attachment | None = None
        self._profiles: dict[tuple[int, float], int] = {}  # Describe's memory profiles, by input
        self.draining = threading.Event()     # SIGTERM: results tell the scheduler to let go
        # Plans dispatched and results sent (one writer each: the feeder, the stream's thread).
        self.dispatched = 0
        self.sent = 0
        self.last_plan = 0.0                  # monotonic time of the latest plan
        self.cache_bytes = 0                  # the KV cache InitCache allocated (freed by the next)
        self.host_cache_bytes = 0
        self.cache_shape: tuple[int, int, int] | None = None   # InitCache's arguments, last success

    def streaming(self) -> bool:
        """A scheduler holds the Step stream."""
        if self._stream_lock.acquire(blocking=False):
            self._stream_lock.release()
            return False
        return True

    def Describe(self, request, context):
        block_size = request.block_size or 16
        fraction = request.memory_fraction or 0.9
        ex = self.executor
        c = ex.config
        free = memory.free_memory_bytes(ex.device)
        budget = self._kv_budget(context, request.max_num_batched_tokens or 8192, fraction,
                                 request.max_num_seqs)
        per_block = ex.bytes_per_block(block_size)
        return worker_pb2.DescribeResponse(
            model=c.name, device=str(ex.device), dtype=str(ex.dtype).removeprefix("torch."),
            num_layers=c.num_layers, vocab_size=c.vocab_size, max_model_len=c.max_model_len,
            eos_token_ids=list(c.eos_token_ids), weight_bytes=self.weight_bytes,
            free_memory_bytes=free, bytes_per_block=per_block,
            num_blocks_available=budget // per_block, pipeline_parallel_size=ex.depth)

    def _kv_budget(self, context, tokens: int, fraction: float, seqs: int) -> int:
        """KV bytes the device can hold. On the CPU, arithmetic. On an accelerator, a worst-case
        iteration runs first (activations and CUDA graphs need room too): only for a caller
        that could attach (not while another scheduler is served), never beside a Step stream,
        and once per input (a repeated Describe reuses the profile)."""
        ex = self.executor
        if ex.device.type == "cpu":
            return min(memory.host_kv_budget(fraction), self.cpu_cache_limit)
        key = (tokens, fraction, seqs)
        if key in self._profiles:
            return self._profiles[key]
        self._refuse_unless_free(context, "profile its memory")
        if not self._stream_lock.acquire(blocking=False):
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          "this worker is serving a step stream: its memory is profiled only before one "
                          "opens; call Describe before InitCache")
        try:
            self._profiles[key] = ex.profile_free_memory(tokens, fraction, seqs)
        finally:
            self._stream_lock.release()
        return self._profiles[key]

    # --- attachment ---------------------------------------------------------------------------
    def _other(self, caller: str, now: float) -> _Attachment | None:
        """The attachment of another scheduler that `caller` must respect, if any."""
        a = self.attached
        if a is None or a.caller == caller:
            return None
        if a.stream is None and now - a.since > ATTACH_GRACE_S:
            return None   # it called InitCache and never opened its stream
        return a

    def _refuse_unless_free(self, context, what: str) -> str:
        """The caller's identity, or FAILED_PRECONDITION when another scheduler is attached."""
        caller = caller_identity(context)
        now = time.monotonic()
        with self._attach_lock:
            other = self._other(caller, now)
        if other is not None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"this worker serves another scheduler (attached {now - other.since:.0f} s ago), "
                          f"so it will not {what} for you; it is free once that scheduler's step stream "
                          f"ends")
        return caller

    def _attach(self, context, what: str, stream: Any = None) -> None:
        """Takes the stream lock for the caller, ending its own previous stream if one is open
        (the same scheduler, reconnected or restarted); FAILED_PRECONDITION if another scheduler
        is attached. The caller releases the lock."""
        caller = self._refuse_unless_free(context, what)
        with self._attach_lock:
            mine = self.attached
        if mine is not None and mine.caller == caller and mine.stream is not None:
            mine.stream.cancel()
        if not self._stream_lock.acquire(timeout=HANDOVER_S):
            context.abort(grpc.StatusCode.UNAVAILABLE, "the previous step stream did not end: retry")
        now = time.monotonic()
        with self._attach_lock:
            other = self._other(caller, now)
            if other is None:
                self.attached = _Attachment(caller, now, stream)
        if other is not None:   # another scheduler came in while the previous stream ended
            self._stream_lock.release()
            self._refuse_unless_free(context, what)

    def _detach(self, stream: Any) -> None:
        """The stream ended: its scheduler lets go of the worker (unless it opened another)."""
        with self._attach_lock:
            if self.attached is not None and self.attached.stream is stream:
                self.attached = None

    def InitCache(self, request, context):
        self._refuse_unless_free(context, "allocate a KV cache")
        if request.num_blocks < 1 or request.block_size < 1:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "num_blocks and block_size must be >= 1")
        if request.block_size > MAX_BLOCK_SIZE:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"block_size {request.block_size} is over {MAX_BLOCK_SIZE} tokens")
        ex = self.executor
        per_block = ex.bytes_per_block(request.block_size)
        wanted = request.num_blocks * per_block
        host_wanted = request.num_host_blocks * per_block
        # What the device could hold once the current cache is freed: a size it cannot hold is
        # refused before the current cache goes, so the worker keeps serving with it.
        room = memory.free_memory_bytes(ex.device) + self.cache_bytes
        host_room = memory.free_memory_bytes(torch.device("cpu")) + self.host_cache_bytes
        if ex.device.type == "cpu":   # one memory for both caches
            wanted, host_wanted = wanted + host_wanted, 0
        if wanted > room or host_wanted > host_room:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{request.num_blocks} KV blocks (+{request.num_host_blocks} on the host) of "
                          f"{per_block} bytes do not fit: {room >> 20} MiB available on {ex.device}"
                          f"{'' if ex.device.type == 'cpu' else f', {host_room >> 20} MiB on the host'}; "
                          f"Describe says how many blocks fit")
        self._attach(context, "allocate a KV cache")
        try:
            cache_bytes = ex.init_cache(request.num_blocks, request.block_size, request.num_host_blocks)
        except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
            # The check above was not enough (fragmentation, another process): put the cache
            # this worker had back, so that its scheduler can go on.
            if self.cache_shape is not None:
                ex.init_cache(*self.cache_shape)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"allocating {request.num_blocks} KV blocks failed ({type(e).__name__}); "
                          f"the previous cache stays: ask for fewer (Describe says how many fit)")
        finally:
            self._stream_lock.release()
        self.cache_bytes = cache_bytes
        self.host_cache_bytes = request.num_host_blocks * per_block
        self.cache_shape = (request.num_blocks, request.block_size, request.num_host_blocks)
        if ex.device.type == "cuda":  # graphs are captured: anything compiled from now on stalls
            watch_triton_compiles(log)
        return worker_pb2.InitCacheResponse(cache_bytes=cache_bytes)

    def Step(self, request_iterator: Iterator[bytes], context) -> Iterator[bytes]:
        self._attach(context, "open a step stream", stream=context)
        feeding = threading.Lock()    # held by the feeder while it dispatches a plan
        closed = threading.Event()    # this stream is over: the feeder dispatches no more
        try:
            # A new stream means a new scheduler: forget sequences from the previous one.
            self.executor.reset()
            # A feeder thread dispatches plans as they arrive, so the host prepares step i+1 while
            # the device runs step i (and a pipeline's first stage takes plan i+1 while a later
            # one runs plan i); this generator collects each step's result in order.
            dispatched: queue.SimpleQueue = queue.SimpleQueue()
            threading.Thread(target=self._feed, args=(request_iterator, dispatched, feeding, closed),
                             daemon=True, name="worker-dispatch").start()
            while (item := dispatched.get()) is not None:
                try:
                    if isinstance(item, BaseException):
                        raise item
                    result = self.executor.collect(item)
                except (PlanError, ExecutorBroken) as e:
                    self._fail(e, context)
                self.sent += 1
                yield result + _DRAINING_FIELD if self.draining.is_set() else result
        finally:
            self.sent = self.dispatched
            self._end_stream(feeding, closed)
            self._detach(context)

    def _feed(self, request_iterator: Iterator[bytes], dispatched: queue.SimpleQueue,
              feeding: threading.Lock, closed: threading.Event) -> None:
        try:
            for plan in request_iterator:
                with feeding:
                    if closed.is_set():
                        return
                    self.dispatched += 1
                    self.last_plan = time.monotonic()
                    handle = self.executor.dispatch(plan)
                dispatched.put(handle)
        except grpc.RpcError:
            pass   # the scheduler went away: the stream ends
        except Exception as e:  # noqa: BLE001 - surface it to the stream rather than lose it
            dispatched.put(e)
        dispatched.put(None)

    def _end_stream(self, feeding: threading.Lock, closed: threading.Event) -> None:
        """Lets the next scheduler's stream in once no dispatch of this one can reach the
        executor any more. A feeder waiting for the next plan is simply told to stop: its request
        iterator ends only once this RPC is over, after the status this thread is about to send.
        A dispatch under way is waited for (30 s at most) on another thread, so that the status
        is not held back either."""
        def close(locked: bool) -> None:
            closed.set()
            if locked:
                feeding.release()
            self._stream_lock.release()

        if feeding.acquire(blocking=False):
            close(locked=True)
        else:
            threading.Thread(target=lambda: close(feeding.acquire(timeout=30)), daemon=True,
                             name="worker-stream-end").start()

    def _fail(self, error: PlanError | ExecutorBroken, context) -> NoReturn:
        """The Step stream's error policy. Any other error fails the RPC as it is (UNKNOWN), and
        the worker serves the next stream."""
        if isinstance(error, PlanError):
            # A scheduler bug or a lost message: this stream is over, the executor is fine.
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))
        # Nothing this executor computes can be trusted: tell the scheduler, then end the process
        # (a replica's other ranks follow when its heartbeats stop).
        log.error("worker step failed: %s", error)
        threading.Timer(BROKEN_EXIT_DELAY_S, exit_now, args=(BROKEN_EXIT_CODE,)).start()
        context.abort(grpc.StatusCode.UNAVAILABLE, str(error))


def _bounded_unary(behavior, request_type, response_type) -> grpc.RpcMethodHandler:
    """A unary method served as client-streaming, so that the handler starts before the request
    has arrived and can bound the wait for it (REQUEST_WAIT_S): a caller that opens the call and
    sends nothing is cancelled instead of holding a thread. Clients see an ordinary unary call."""
    def handle(requests: Iterator[bytes], context):
        timer = threading.Timer(REQUEST_WAIT_S, context.cancel)
        timer.start()
        try:
            data = next(requests, None)
        except grpc.RpcError:
            data = None
        finally:
            timer.cancel()
        if not context.is_active():
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                          f"no request message within {REQUEST_WAIT_S:g} s")
        if data is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a request message is required")
        try:
            request = request_type.FromString(data)
        except DecodeError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"not a {request_type.__name__}: {e}")
        return behavior(request, context)

    return grpc.stream_unary_rpc_method_handler(handle, response_serializer=response_type.SerializeToString)


def method_handlers(svc: WorkerService) -> dict[str, grpc.RpcMethodHandler]:
    return {
        "Describe": _bounded_unary(svc.Describe, worker_pb2.DescribeRequest, worker_pb2.DescribeResponse),
        "InitCache": _bounded_unary(svc.InitCache, worker_pb2.InitCacheRequest, worker_pb2.InitCacheResponse),
        # No (de)serializer: BatchPlan bytes in, StepResult bytes out, coded by the executor.
        "Step": grpc.stream_stream_rpc_method_handler(svc.Step),
    }


def serve_worker(executor: Executor[Any], config: WorkerConfig, weight_bytes: int,
                 name: str = "worker") -> None:
    """Serves the Worker service on config's address until SIGTERM or SIGINT, then drains
    (drain_and_stop). With config.scheduler, joins that scheduler and keeps announcing itself.
    `name`: how this process signs its log lines."""
    # The dispatch thread holds the GIL for the whole of an eager step's kernel launches (tens
    # of ms for a hybrid step); at Python's default 5 ms switch interval the thread that returns
    # the previous step's tokens waits that long, and so does the scheduler's next plan.
    sys.setswitchinterval(5e-4)
    tls = config.internal_tls()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="worker-rpc"),
                         options=GRPC_OPTIONS, maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS)
    service = WorkerService(executor, weight_bytes, config.cpu_cache_bytes)
    handlers = method_handlers(service)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
    listen(server, config.host, config.port, name, tls.server_credentials() if tls else None)
    server.start()
    print(f"{name}: listening on {config.host}:{config.port}"
          f"{' (mutual TLS)' if tls else ''}", flush=True)
    if config.scheduler:
        threading.Thread(target=announce, args=(config, tls, service.draining, name), daemon=True,
                         name="worker-join").start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    drain_and_stop(service, config.drain_seconds, name)
    executor.stop()
    server.stop(0)
    # Interpreter teardown with gRPC's C++ threads still alive (the announcer's Join, the
    # server's) can abort ("terminate called without an active exception", exit -6, seen in
    # CI): everything is done, so end here without waiting for them.
    sys.stdout.flush()
    sys.stderr.flush()
    exit_now(0)


def drain_and_stop(service: WorkerService, drain_s: float, name: str) -> None:
    """Marks every result from now on `draining`, so the scheduler places nothing new here and
    moves or finishes this worker's requests, then closes the stream. Returns once it has, once
    the worker sits idle (no plan for a while: nothing of a scheduler's would be lost), or after
    drain_s seconds."""
    service.draining.set()
    log.info("%s: shutting down; the scheduler has %g s to let go", name, drain_s)
    deadline = time.monotonic() + drain_s
    while time.monotonic() < deadline:
        if not service.streaming():
            return
        if service.dispatched == service.sent and time.monotonic() - service.last_plan > IDLE_S:
            return
        time.sleep(0.05)
    log.warning("%s: the scheduler still held the stream after %g s", name, drain_s)


def announce(config: WorkerConfig, tls: InternalTLS | None, draining: threading.Event, name: str) -> None:
    """Joins the scheduler, then says so again every JOIN_INTERVAL_S (a scheduler that restarted
    learns its workers back; one that lost this worker dials it again). With internal TLS, over
    mutual TLS to the scheduler's --internal-port."""
    address = config.advertised_address()
    assert config.scheduler is not None
    channel = (grpc.secure_channel(config.scheduler, tls.channel_credentials(),
                                   options=tls.channel_options(config.internal_peer_name))
               if tls else grpc.insecure_channel(config.scheduler))
    stub = worker_pb2_grpc.MembershipStub(channel)
    joined = False
    while not draining.is_set():
        try:
            stub.Join(worker_pb2.JoinRequest(address=address), timeout=5)
            if not joined:
                print(f"{name}: joined the scheduler at {config.scheduler} as {address}", flush=True)
            joined = True
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                log.warning("%s: %s takes no joins on this port: point --scheduler at the scheduler's "
                            "--internal-port", name, config.scheduler)
            elif joined or e.code() != grpc.StatusCode.UNAVAILABLE:
                log.warning("%s: the scheduler at %s: %s", name, config.scheduler, e.code().name)
            joined = False
        draining.wait(JOIN_INTERVAL_S)
    channel.close()

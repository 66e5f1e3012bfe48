"""The router's gRPC services: the client API of a scheduler (Generate, ModelInfo, health,
reflection) forwarded to the schedulers, and RouterMembership.Join on its own port.

Generate is passed through as bytes both ways: the request is parsed once for placement (its
prompt's prefix and size), the responses are never parsed (a message is a token; counting them is
all the router needs). The caller's metadata (its bearer token) and deadline go along.
"""

from __future__ import annotations

import array
import asyncio
import logging
import signal
import time
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos import generation_pb2, router_pb2, router_pb2_grpc
from router_service.config import RouterConfig
from router_service.discovery import expire_joins, follow_dns, parse_dns_target
from router_service.metrics import RouterMetrics
from router_service.placement import MAX_BLOCKS, PrefixTable, choose, prefix_chain
from router_service.pool import STATIC, Member, Pool
from sarathi_common.auth import BearerTokenInterceptor, InternalTLS
from sarathi_common.net import listen

log = logging.getLogger("sarathi.router")
SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
GENERATE = f"/{SERVICE_NAME}/Generate"
MODEL_INFO = f"/{SERVICE_NAME}/ModelInfo"
# Initial metadata on every Generate stream: which scheduler serves it (for operators and tests).
SCHEDULER_HEADER = "x-sarathi-scheduler"
DEFAULT_MAX_TOKENS = 16      # the scheduler's default when max_tokens is unset
CHARS_PER_TOKEN = 4          # a text prompt's size in tokens, roughly, without a tokenizer
# Call metadata that belongs to this hop, not the caller: everything else goes on.
_HOP_METADATA = frozenset({"user-agent", "content-type", "te", "host", "grpc-accept-encoding",
                           "grpc-encoding", "grpc-timeout", "accept-encoding"})


@dataclass(frozen=True)
class Routed:
    """What placement needs of a request: its prompt's leading bytes and its size in tokens."""

    key: bytes
    prompt_tokens: int
    max_tokens: int


def routed(data: bytes, block_bytes: int) -> Routed:
    """A request that does not parse is placed by load alone; the scheduler explains what is
    wrong with it."""
    try:
        request = generation_pb2.GenerateRequest.FromString(data)
    except DecodeError:
        return Routed(b"", 0, DEFAULT_MAX_TOKENS)
    p = request.sampling
    max_tokens = p.max_tokens if p.HasField("max_tokens") and p.max_tokens > 0 else DEFAULT_MAX_TOKENS
    kind = request.WhichOneof("prompt")
    if kind == "token_ids":
        ids = request.token_ids.ids
        head = ids[:MAX_BLOCKS * block_bytes // 4]
        return Routed(b"i" + array.array("I", head).tobytes(), len(ids), max_tokens)
    if kind == "text":
        key = b"t" + request.text.encode()
    elif kind == "chat":
        # Not the chat template's rendering, but the same order: prompts that share their first
        # messages share their first bytes here too.
        key = b"c" + b"".join(m.role.encode() + b"\x1f" + m.content.encode() + b"\x1e"
                              for m in request.chat.messages)
    else:
        key = b""
    return Routed(key, len(key) // CHARS_PER_TOKEN, max_tokens)


def forwarded_metadata(metadata) -> tuple[tuple[str, str | bytes], ...]:
    return tuple((m.key, m.value) for m in metadata or ()
                 if not m.key.startswith(":") and m.key not in _HOP_METADATA)


class Router:
    def __init__(self, pool: Pool, config: RouterConfig, metrics: RouterMetrics) -> None:
        self.pool = pool
        self.policy = config.placement_policy()
        self.block_bytes = config.affinity_block_bytes
        self.table = PrefixTable(config.affinity_entries)
        self.metrics = metrics
        self.draining = False
        self.open_streams = 0
        self.stream_ended = asyncio.Event()   # set whenever a stream ends (drain waits on it)

    def _place(self, chain: tuple[bytes, ...], tried: set[str]) -> Member | None:
        decision = choose(self.pool.loads(tried), chain, self.table, self.policy)
        if decision is None:
            return None
        self.metrics.placements.labels(decision.reason).inc()
        if chain:
            self.table.record(chain, decision.address)
        return self.pool.members[decision.address]

    async def generate(self, request: bytes, context: grpc.aio.ServicerContext):
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the router is shutting down: retry")
        r = routed(request, self.block_bytes)
        chain = prefix_chain(r.key, self.block_bytes)
        metadata = forwarded_metadata(context.invocation_metadata())
        self.open_streams += 1
        outcome = "cancelled"
        tried: set[str] = set()
        try:
            while True:
                member = self._place(chain, tried)
                if member is None:
                    outcome = "unavailable"
                    await context.abort(grpc.StatusCode.UNAVAILABLE, (
                        "no scheduler is serving: retry when health is SERVING" if not tried else
                        "its scheduler failed before the first token and no other is serving: retry"))
                tried.add(member.address)
                ticket = self.pool.acquire(member, r.prompt_tokens, r.max_tokens)
                call = member.channel.unary_stream(GENERATE)(
                    request, metadata=metadata, timeout=context.time_remaining())
                lost = []   # non-empty once the pool gave up on the member (it stopped answering)
                ticket.on_lost = lambda call=call, lost=lost: (lost.append(True), call.cancel())
                sent = 0
                try:
                    async for message in call:
                        if not sent:
                            await context.send_initial_metadata(((SCHEDULER_HEADER, member.address),))
                        ticket.token()
                        sent += 1
                        yield message
                    outcome = "ok"
                    return
                except (grpc.aio.AioRpcError, asyncio.CancelledError) as e:
                    if isinstance(e, asyncio.CancelledError) and not lost:
                        raise   # the caller went away
                    code = e.code() if isinstance(e, grpc.aio.AioRpcError) else grpc.StatusCode.UNAVAILABLE
                    details = (e.details() if isinstance(e, grpc.aio.AioRpcError) else None) or (
                        "its scheduler stopped answering" if lost else code.name)
                    if code == grpc.StatusCode.UNAVAILABLE:
                        self.pool.suspect(member, details)
                        if not sent and len(tried) == 1:   # nothing streamed yet: once elsewhere
                            self.metrics.retries.inc()
                            log.info("retrying a request on another scheduler: %s failed before its "
                                     "first token (%s)", member.address, details)
                            continue
                    outcome = "unavailable" if code == grpc.StatusCode.UNAVAILABLE else "error"
                    await context.abort(code, details + (": retry" if lost else ""))
                finally:
                    ticket.release()
                    call.cancel()   # the client went away or we aborted: free the scheduler's slot
        finally:
            self.metrics.finished.labels(outcome).inc()
            self.open_streams -= 1
            self.stream_ended.set()

    async def model_info(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        metadata = forwarded_metadata(context.invocation_metadata())
        tried: set[str] = set()
        for _ in range(2):
            member = self._place((), tried)
            if member is None:
                break
            tried.add(member.address)
            try:
                return await member.channel.unary_unary(MODEL_INFO)(
                    request, metadata=metadata, timeout=context.time_remaining() or 10.0)
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE:
                    await context.abort(e.code(), e.details() or e.code().name)
                self.pool.suspect(member, e.details() or "unavailable")
        await context.abort(grpc.StatusCode.UNAVAILABLE, "no scheduler is serving: retry when health is "
                                                         "SERVING")


class MembershipService(router_pb2_grpc.RouterMembershipServicer):
    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    async def Join(self, request, context):
        host, sep, port = request.address.rpartition(":")
        if not sep or not host or not port.isdigit():
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "address must be host:port")
        return router_pb2.RouterJoinResponse(known=self.pool.join(request.address))


def _channel_factory(config: RouterConfig, internal: InternalTLS | None):
    options = [("grpc.max_send_message_length", int(config.max_message_mb * (1 << 20))),
               ("grpc.max_receive_message_length", 64 << 20),
               # A scheduler that restarts is dialled again within about a second (gRPC's
               # default backoff grows to two minutes).
               ("grpc.initial_reconnect_backoff_ms", 250),
               ("grpc.min_reconnect_backoff_ms", 250),
               ("grpc.max_reconnect_backoff_ms", 1000)]
    if internal is None:
        return lambda address: grpc.aio.insecure_channel(address, options=options)
    credentials = internal.channel_credentials()
    options += internal.channel_options(config.internal_peer_name)
    return lambda address: grpc.aio.secure_channel(address, credentials, options=options)


async def serve_router(config: RouterConfig) -> None:
    """Runs the router until SIGTERM or SIGINT, then drains: new calls get UNAVAILABLE and
    health NOT_SERVING, open streams have up to --drain-seconds to finish."""
    static = config.static_schedulers()
    dns = parse_dns_target(config.scheduler_dns) if config.scheduler_dns else None
    if not static and dns is None and config.join_port is None:
        raise SystemExit("sarathi router: no schedulers: name them (--scheduler HOST:PORT,...), give a "
                         "DNS name (--scheduler-dns NAME:PORT) or let them join (--join-port PORT)")
    internal = config.internal_tls()
    token = config.api_token()
    credentials = config.api_credentials()
    loop = asyncio.get_running_loop()
    metrics = RouterMetrics()
    if config.metrics_port is not None:
        metrics.serve(config.host, config.metrics_port)
    health_servicer = health.aio.HealthServicer()
    router: Router | None = None

    def set_health() -> None:
        serving = router is not None and not router.draining and bool(pool.in_rotation())
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", SERVICE_NAME):
            loop.create_task(health_servicer.set(name, status))

    pool = Pool(_channel_factory(config, internal), metrics, config.health_interval, config.join_ttl,
                on_change=set_health)
    router = Router(pool, config, metrics)
    server = grpc.aio.server(interceptors=[BearerTokenInterceptor(token)] if token else [], options=[
        ("grpc.max_receive_message_length", int(config.max_message_mb * (1 << 20))),
        ("grpc.so_reuseport", 0)])
    handlers = {"Generate": grpc.unary_stream_rpc_method_handler(router.generate),
                "ModelInfo": grpc.unary_unary_rpc_method_handler(router.model_info)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    listen(server, config.host, config.port, "sarathi router", credentials)
    servers = [server]
    if config.join_port is not None:
        join_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        router_pb2_grpc.add_RouterMembershipServicer_to_server(MembershipService(pool), join_server)
        listen(join_server, config.host, config.join_port, "sarathi router (join port)",
               internal.server_credentials() if internal else None)
        servers.append(join_server)
    for s in servers:
        await s.start()
    log.info("router API on %s:%d%s%s; schedulers: %s", config.host, config.port,
             " over TLS" if credentials else "", ", bearer token required" if token else "",
             ", ".join(filter(None, [",".join(static), config.scheduler_dns and f"DNS {config.scheduler_dns}",
                                     config.join_port and f"joining on port {config.join_port}"])))
    pool.set_source(STATIC, set(static))
    tasks = []
    if dns is not None:
        tasks.append(loop.create_task(follow_dns(pool, *dns, config.dns_interval)))
    if config.join_port is not None:
        tasks.append(loop.create_task(expire_joins(pool, 1.0)))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        await _drain(router, set_health, config.drain_seconds)
    finally:
        for task in tasks:
            task.cancel()
        for s in servers:
            await s.stop(grace=1)
        await pool.close()


async def _drain(router: Router, set_health, drain_s: float) -> None:
    """Stops taking requests and lets the open streams finish, for up to drain_s seconds."""
    router.draining = True
    set_health()
    log.info("shutting down: %d streams in flight get up to %g s to finish", router.open_streams, drain_s)
    deadline = time.monotonic() + drain_s
    while router.open_streams and time.monotonic() < deadline:
        router.stream_ended.clear()
        try:
            await asyncio.wait_for(router.stream_ended.wait(), timeout=deadline - time.monotonic())
        except TimeoutError:
            break
    if router.open_streams:
        log.warning("%d streams did not finish within %g s: they end now", router.open_streams, drain_s)

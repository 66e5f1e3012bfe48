"""The frontend process: the client-facing gRPC API (Generate, ModelInfo, health, reflection).

It validates and tokenizes requests, hands them to the engine process over ZeroMQ, and streams
detokenized tokens back. The engine never waits on a client: a slow stream only fills its own
queue here.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos import generation_pb2, generation_pb2_grpc, worker_pb2, worker_pb2_grpc
from protos.batch_plan import SamplingOptions
from sarathi_common.auth import BearerTokenInterceptor, InternalTLS
from sarathi_common.lifecycle import release_freed_memory
from sarathi_common.net import listen
from scheduler_service.config import SchedulerConfig
from scheduler_service.detokenizer import IncrementalDetokenizer
from scheduler_service.engine_client import EngineClient
from scheduler_service.messages import (
    AbortRequest,
    AddRequest,
    AddWorker,
    EngineFailed,
    EngineReady,
    RequestFailed,
    RequestRejected,
    RequestUpdate,
)
from scheduler_service.metrics import ServerMetrics
from scheduler_service.request import FinishReason
from scheduler_service.router_link import announce
from scheduler_service.trace import to_proto

log = logging.getLogger("sarathi.frontend")
SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
OPERATOR_SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["Operator"].full_name
DEFAULT_MAX_TOKENS = 16
DEADLINE_SLACK_S = 0.5
# Sampling ranges. A positive temperature below MIN_TEMPERATURE overflows the scaled logits
# (1e-45 gives NaN probabilities), one above MAX_TEMPERATURE is uniform noise.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 100.0
MAX_STOP_STRINGS, MAX_STOP_CHARS, MAX_STOP_TOKEN_IDS = 64, 1024, 1024
# Roles the chat template gives a meaning to; any other is refused before templating.
CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})

_FINISH = {FinishReason.STOP: generation_pb2.FINISH_REASON_STOP,
           FinishReason.LENGTH: generation_pb2.FINISH_REASON_LENGTH,
           FinishReason.ABORT: generation_pb2.FINISH_REASON_ABORT}


class BadRequest(ValueError):
    """Maps to INVALID_ARGUMENT; the message says what is wrong."""


class Undecodable:
    """A request whose bytes are not a GenerateRequest (e.g. a string field that is not UTF-8).
    gRPC would answer a deserializer's exception with UNKNOWN before any handler ran; the
    handler answers this one with INVALID_ARGUMENT."""

    def __init__(self, error: str) -> None:
        self.error = error


def _max_chars_per_token(tokenizer) -> int:
    """An upper bound on the characters one token covers: its longest vocabulary entry (a
    byte-level entry has one character per byte, so it bounds the decoded characters too), times
    4 where a normalizer may compose several characters into one."""
    longest = max(map(len, tokenizer.get_vocab()), default=1)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    normalizes = backend is None or backend.normalizer is not None
    return longest * (4 if normalizes else 1)


class Oversized:
    """A request larger than any that could fit the model's context: refused by its size alone,
    without parsing it (parsing runs on the event loop: 2 s of every stream's time for 100 MB)."""

    def __init__(self, size: int, limit: int) -> None:
        self.size, self.limit = size, limit


class GenerationService(generation_pb2_grpc.GenerationServicer):
    def __init__(self, engine: EngineClient, tokenizer, model_name: str, max_queue: int) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        # Tokenizing and chat templating run here, off the event loop, so that a huge prompt
        # delays only its own call (the Rust tokenizer lets go of the GIL while it works).
        self.tokenize_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenize")
        self.max_chars_per_token = _max_chars_per_token(tokenizer) if tokenizer is not None else 0
        self.model_name = model_name
        self.max_queue = max_queue
        self._ids = itertools.count(1)
        self.draining = False
        self.stream_ended = asyncio.Event()   # set whenever a stream ends (drain waits on it)

    async def ModelInfo(self, request, context):
        info = await self._ready_info(context)
        return generation_pb2.ModelInfoResponse(
            model=self.model_name or info.model, max_model_len=info.max_model_len,
            vocab_size=info.vocab_size, has_tokenizer=self.tokenizer is not None,
            block_size=info.block_size, num_kv_blocks=self.engine.num_kv_blocks or info.num_kv_blocks,
            dtype=info.dtype,
            device=info.device, eos_token_ids=info.eos_token_ids)

    def decode_request(self, data: bytes):
        """Generate's request deserializer (it runs on the event loop)."""
        limit = self.request_limit()
        if limit and len(data) > limit:
            return Oversized(len(data), limit)
        try:
            return generation_pb2.GenerateRequest.FromString(data)
        except DecodeError as e:
            return Undecodable(str(e) or "malformed message")

    def request_limit(self) -> int:
        """The most bytes a request whose prompt fits the context can take (0: not known before
        the engine is ready): each prompt character at most 4 bytes of UTF-8; each chat message
        (at most one per context token) or token id a few bytes of framing; the stop fields are
        capped; sampling is small."""
        info = self.engine.ready
        if info is None:
            return 0
        return (4 * info.max_model_len * self.max_chars_per_token + 32 * info.max_model_len
                + MAX_STOP_STRINGS * (4 * MAX_STOP_CHARS + 8) + 6 * MAX_STOP_TOKEN_IDS + 4096)

    async def Generate(self, request, context):
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the scheduler is shutting down: retry")
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the request is not a valid GenerateRequest (strings must be UTF-8): "
                                f"{request.error}")
        info = await self._ready_info(context)
        if isinstance(request, Oversized):
            release_freed_memory()   # gRPC's buffers for the message went back to the heap
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the request is {request.size} bytes: no prompt that fits the model's "
                                f"context of {info.max_model_len} tokens takes more than {request.limit}")
        try:
            params = request.sampling
            self._check_sampling(params, info)   # cheap checks before tokenizing
            prompt_ids = await asyncio.get_running_loop().run_in_executor(
                self.tokenize_pool, self._prompt_ids, request, info)
            max_tokens, options, stop_ids = self._sampling(params, info, len(prompt_ids))
        except BadRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if len(self.engine.streams) >= self.max_queue:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{self.max_queue} requests in flight: retry later")
        seq_id = next(self._ids)
        detok = (IncrementalDetokenizer(self.tokenizer, prompt_ids, list(params.stop))
                 if self.tokenizer is not None else None)
        finished = False
        completion = 0
        scheduling_delay_ns = 0
        metrics = self.engine.metrics
        arrival = last = time.monotonic()
        stream = self.engine.add_stream(AddRequest(
            seq_id=seq_id, prompt_token_ids=prompt_ids, sampling=options, max_tokens=max_tokens,
            stop_token_ids=stop_ids, priority=request.priority, arrival_time=arrival))
        try:
            while True:
                msg = await stream.queue.get()
                if isinstance(msg, RequestRejected):   # it can never fit: retrying cannot help
                    finished = True
                    metrics.finished.labels("rejected").inc()
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, msg.message)
                if isinstance(msg, RequestFailed):
                    finished = True
                    metrics.finished.labels("failed").inc()
                    await context.abort(grpc.StatusCode.UNAVAILABLE, msg.message)
                if isinstance(msg, EngineFailed):
                    finished = True
                    metrics.finished.labels("failed").inc()
                    await context.abort(grpc.StatusCode.UNAVAILABLE, f"the scheduler failed: {msg.message}")
                assert isinstance(msg, RequestUpdate)
                completion += len(msg.new_token_ids)
                if msg.scheduling_delay_s is not None:
                    scheduling_delay_ns = int(msg.scheduling_delay_s * 1e9)
                now = time.monotonic()
                if completion == len(msg.new_token_ids):
                    metrics.ttft.observe(now - arrival)
                else:
                    metrics.tbt.observe(now - last)
                last = now
                metrics.generated.inc(len(msg.new_token_ids))
                reason = msg.finish_reason
                text = ""
                if detok is not None:
                    step = detok.add(msg.new_token_ids)
                    text = step.text
                    if step.stopped:
                        reason = FinishReason.STOP
                yield generation_pb2.GenerateResponse(chunk=generation_pb2.TokenChunk(
                    token_ids=msg.new_token_ids, text=text))
                if reason is not None:
                    finished = True
                    metrics.finished.labels(reason.value).inc()
                    if msg.finish_reason is None:  # a stop string: the engine must stop too
                        self._abort(seq_id)
                    tail = detok.flush() if detok is not None and reason is not FinishReason.STOP else ""
                    yield generation_pb2.GenerateResponse(finished=generation_pb2.Finished(
                        reason=_FINISH[reason], text=tail, scheduling_delay_ns=scheduling_delay_ns,
                        usage=generation_pb2.Usage(prompt_tokens=len(prompt_ids),
                                                   completion_tokens=completion)))
                    return
        finally:
            self.engine.streams.pop(seq_id, None)
            if not finished:  # cancelled by the client, its deadline, or the connection dropped
                self._abort(seq_id)
                # The client's deadline passes a little before the server's copy of it (which
                # started when the call arrived): within DEADLINE_SLACK_S it counts as a timeout.
                remaining = context.time_remaining()
                timed_out = remaining is not None and remaining <= DEADLINE_SLACK_S
                metrics.finished.labels("timeout" if timed_out else "cancelled").inc()
            self.stream_ended.set()

    def _abort(self, seq_id: int) -> None:
        self.engine.send_nowait(AbortRequest(seq_id))

    async def _ready_info(self, context) -> EngineReady:
        if self.engine.fatal is not None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the scheduler failed: {self.engine.fatal}")
        if self.engine.ready is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                "no worker is ready yet (loading the model, or none has joined): retry "
                                "when health is SERVING")
        return self.engine.ready

    def _prompt_ids(self, request, info: EngineReady) -> list[int]:
        kind = request.WhichOneof("prompt")
        if kind is None:
            raise BadRequest("empty prompt: set text, chat or token_ids")
        if kind == "token_ids":
            ids = list(request.token_ids.ids)
            bad = [t for t in ids if t >= info.vocab_size]
            if bad:
                raise BadRequest(f"unknown token id {bad[0]}: the vocabulary has {info.vocab_size} tokens")
        else:
            if self.tokenizer is None:
                raise BadRequest("this model has no tokenizer: send token_ids")
            self._check_text_length(request, kind, info)
            if kind == "text":
                if not request.text:
                    raise BadRequest("empty prompt: text is empty")
                ids = self.tokenizer.encode(request.text, add_special_tokens=False)
            else:
                messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
                if not messages:
                    raise BadRequest("empty prompt: chat has no messages")
                for i, m in enumerate(messages):
                    if m["role"] not in CHAT_ROLES:
                        raise BadRequest(f"chat message {i}: unknown role {m['role'][:40]!r}; roles are "
                                         f"{', '.join(sorted(CHAT_ROLES))}")
                try:
                    ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                             tokenize=True, return_dict=False)
                except Exception as e:  # template errors are the client's: roles out of order etc.
                    raise BadRequest(f"chat template failed: {e}") from e
                if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                    ids = ids["input_ids"]
                ids = list(ids)
        if not ids:
            raise BadRequest("empty prompt: it has no tokens")
        if len(ids) >= info.max_model_len:
            raise BadRequest(f"prompt has {len(ids)} tokens; the model's context is {info.max_model_len} "
                             f"and at least one token must be generated")
        return ids

    def _check_text_length(self, request, kind: str, info: EngineReady) -> None:
        """Text too long to fit the context whatever it tokenizes to is refused without
        tokenizing it (seconds of CPU and a gigabyte of memory for a 16 MB prompt)."""
        if kind == "chat" and len(request.chat.messages) > info.max_model_len:
            raise BadRequest(f"chat has {len(request.chat.messages)} messages: more than the model's "
                             f"context of {info.max_model_len} tokens can hold")
        chars = len(request.text) if kind == "text" else sum(len(m.content) for m in request.chat.messages)
        limit = info.max_model_len * self.max_chars_per_token
        if chars > limit:
            raise BadRequest(f"prompt has {chars} characters: more than the model's context of "
                             f"{info.max_model_len} tokens can hold (at most {limit} characters)")

    def _check_sampling(self, p, info: EngineReady) -> None:
        """Every sampling field, for finiteness and range (proto floats may be NaN or inf)."""
        if p.HasField("max_tokens") and p.max_tokens < 1:
            raise BadRequest(f"max_tokens must be at least 1, got {p.max_tokens}")
        if p.HasField("temperature"):
            t = p.temperature
            if not math.isfinite(t) or t < 0:
                raise BadRequest(f"temperature must be a finite number >= 0, got {t}")
            if t != 0 and not MIN_TEMPERATURE <= t <= MAX_TEMPERATURE:
                raise BadRequest(f"temperature must be 0 (greedy) or between {MIN_TEMPERATURE:g} and "
                                 f"{MAX_TEMPERATURE:g}, got {t:g}")
        if p.HasField("top_p") and not (math.isfinite(p.top_p) and 0 < p.top_p <= 1):
            raise BadRequest(f"top_p must be in (0, 1], got {p.top_p}")
        if p.top_k < 0:
            raise BadRequest(f"top_k must be >= 0 (0: off), got {p.top_k}")
        if len(p.stop) > MAX_STOP_STRINGS:
            raise BadRequest(f"at most {MAX_STOP_STRINGS} stop strings, got {len(p.stop)}")
        if any(not s for s in p.stop):
            raise BadRequest("stop strings must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in p.stop):
            raise BadRequest(f"stop strings may have at most {MAX_STOP_CHARS} characters")
        if len(p.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise BadRequest(f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids, got {len(p.stop_token_ids)}")
        bad = [t for t in p.stop_token_ids if t >= info.vocab_size]
        if bad:
            raise BadRequest(f"unknown stop token id {bad[0]}: the vocabulary has {info.vocab_size} tokens")

    def _sampling(self, p, info: EngineReady, prompt_len: int):
        """The engine's settings of a request _check_sampling passed."""
        max_tokens = p.max_tokens if p.HasField("max_tokens") else DEFAULT_MAX_TOKENS
        temperature = p.temperature if p.HasField("temperature") else 1.0
        top_p = p.top_p if p.HasField("top_p") else 1.0
        top_k = p.top_k if p.top_k < info.vocab_size else 0   # k >= the vocabulary keeps every token
        stop_ids = set(p.stop_token_ids)
        if not p.ignore_eos:
            stop_ids.update(info.eos_token_ids)
        max_tokens = min(max_tokens, info.max_model_len - prompt_len)
        options = SamplingOptions(temperature=temperature, top_p=top_p, top_k=top_k,
                                  seed=p.seed if p.HasField("seed") else None)
        return max_tokens, options, frozenset(stop_ids)


class OperatorService(generation_pb2_grpc.OperatorServicer):
    def __init__(self, engine: EngineClient) -> None:
        self.engine = engine

    async def GetTrace(self, request, context):
        if self.engine.ready is None or self.engine.fatal is not None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the engine is not running")
        records = (await self.engine.trace()).records
        if request.limit:
            records = records[-request.limit:]
        return generation_pb2.GetTraceResponse(iterations=[to_proto(r) for r in records])

class MembershipService(worker_pb2_grpc.MembershipServicer):
    """Workers started with --scheduler announce themselves here (and again every few seconds)."""

    def __init__(self, engine: EngineClient) -> None:
        self.engine = engine

    async def Join(self, request, context):
        address = request.address
        if not address or ":" not in address:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "address must be host:port")
        known = address in self.engine.joined
        self.engine.joined.add(address)
        self.engine.send_nowait(AddWorker(address))  # the engine ignores one it already has
        return worker_pb2.JoinResponse(known=known)


def add_generation_service(service: GenerationService, server) -> None:
    """add_GenerationServicer_to_server, with Generate's request decoded by the service."""
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            service.Generate, request_deserializer=service.decode_request,
            response_serializer=generation_pb2.GenerateResponse.SerializeToString),
        "ModelInfo": grpc.unary_unary_rpc_method_handler(
            service.ModelInfo, request_deserializer=generation_pb2.ModelInfoRequest.FromString,
            response_serializer=generation_pb2.ModelInfoResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


async def serve_frontend(config: SchedulerConfig, tokenizer, model_name: str) -> None:
    """Runs the gRPC API until SIGTERM or SIGINT, then drains: new calls get UNAVAILABLE and
    health NOT_SERVING, open streams have up to --drain-seconds to finish. The engine process
    lives as long as this coroutine (and is restarted if it dies)."""
    host, port = config.host, config.port
    loop = asyncio.get_running_loop()
    metrics = ServerMetrics()
    if config.metrics_port is not None:
        metrics.serve(host, config.metrics_port)
    health_servicer = health.aio.HealthServicer()
    service: GenerationService | None = None

    def set_health(serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving and not (service and service.draining) \
            else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            loop.create_task(health_servicer.set(name, status))

    internal_tls = config.internal_tls()
    engine = EngineClient(config, metrics, on_health=set_health)
    token = config.api_token()
    credentials = config.api_credentials()
    server = grpc.aio.server(interceptors=[BearerTokenInterceptor(token)] if token else [], options=[
        ("grpc.max_receive_message_length", int(config.max_message_mb * (1 << 20))),
        ("grpc.so_reuseport", 0)])   # a port in use fails here instead of being shared
    service = GenerationService(engine, tokenizer, model_name, config.max_queue)
    add_generation_service(service, server)
    generation_pb2_grpc.add_OperatorServicer_to_server(OperatorService(engine), server)
    internal = _membership_server(config, internal_tls, MembershipService(engine), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, OPERATOR_SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    listen(server, host, port, "sarathi", credentials)
    if config.local_socket:
        server.add_insecure_port(f"unix:{config.local_socket}")
    if internal is not None:
        listen(internal, host, config.internal_port, "sarathi (internal port)",
               internal_tls.server_credentials() if internal_tls else None)
        await internal.start()
    await server.start()
    log.info("gRPC API on %s:%d%s%s (health NOT_SERVING until a worker has its cache)", host, port,
             " over TLS" if credentials else "", ", bearer token required" if token else "")
    if internal is not None:
        log.info("workers join on %s:%d%s", host, config.internal_port,
                 " (mutual TLS)" if internal_tls else "")
    engine.start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reader = asyncio.create_task(engine.read_events())
    stopping = asyncio.create_task(stop.wait())
    failing = asyncio.create_task(engine.fatal_event.wait())
    announcer = asyncio.create_task(announce(config)) if config.router else None
    try:
        await asyncio.wait((stopping, failing), return_when=asyncio.FIRST_COMPLETED)
        if announcer is not None:   # draining or failed: the router should let go
            announcer.cancel()
        if stop.is_set():
            await _drain(service, set_health, config.drain_seconds)
    finally:
        for task in (reader, stopping, failing, announcer):
            if task is not None:
                task.cancel()
        await server.stop(grace=1)
        if internal is not None:
            await internal.stop(grace=1)
        engine.close()
    if engine.fatal is not None:
        if engine.ready is None:
            raise SystemExit(f"the engine failed before serving: {engine.fatal}")
        raise SystemExit(f"the scheduler cannot serve: {engine.fatal}")


def _membership_server(config: SchedulerConfig, tls: InternalTLS | None, membership: MembershipService,
                       api_server) -> grpc.aio.Server | None:
    """Where workers join: a server of its own on --internal-port (behind mutual TLS when internal
    TLS is set), returned to be started; else the API port, only while internal TLS is off (a
    stranger reaching the API could otherwise make the scheduler dial anything)."""
    if config.internal_port is None:
        if tls is None:
            worker_pb2_grpc.add_MembershipServicer_to_server(membership, api_server)
        else:
            log.info("internal TLS without --internal-port: workers cannot join, only those named "
                     "with --worker are used")
        return None
    internal = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    worker_pb2_grpc.add_MembershipServicer_to_server(membership, internal)
    return internal


async def _drain(service: GenerationService, set_health, drain_s: float) -> None:
    """Stops taking requests and lets the open streams finish, for up to drain_s seconds."""
    service.draining = True
    set_health(False)
    streams = service.engine.streams
    log.info("shutting down: %d streams in flight get up to %g s to finish", len(streams), drain_s)
    deadline = time.monotonic() + drain_s
    while streams and time.monotonic() < deadline:
        service.stream_ended.clear()
        try:
            await asyncio.wait_for(service.stream_ended.wait(), timeout=deadline - time.monotonic())
        except TimeoutError:
            break
    if streams:
        log.warning("%d streams did not finish within %g s: they end now", len(streams), drain_s)

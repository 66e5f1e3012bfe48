"""The OpenAI-compatible HTTP API (Starlette), calling the gRPC API through the asyncio client.

Each HTTP request is one upstream Generate stream. The first delta is awaited before the response
starts, so errors the upstream finds in a request get their HTTP status; later failures end an
event stream with an error event. A caller that disconnects (streaming or not) cancels its
upstream call at once, and the scheduler frees the request's KV blocks."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from sarathi.client import TLS, AsyncClient, Completion, ModelInfo, SarathiError
from sarathi.client.messages import NO_RETRY, Collector, Delta
from sarathi.gateway.config import GatewayConfig
from sarathi.gateway.protocol import ApiError, Parsed, Responder, event, parse_chat, parse_completion

log = logging.getLogger("sarathi.gateway")


def error_response(error: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


async def _disconnected(receive: Receive) -> None:
    """Returns when the caller goes away (the request body has been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class EventStream(Response):
    """A server-sent event stream that ends (closing `events`, and so the upstream call) as
    soon as the caller disconnects, whether or not a chunk is due."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes]):
        # No body, so no content-length (Response.__init__ would set 0).
        self.events = events
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def pump() -> None:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for chunk in self.events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        try:
            await _first_of(pump(), _disconnected(receive))
        except CallerGone:
            pass
        finally:
            await self.events.aclose()  # type: ignore[attr-defined]


class CallerGone(Exception):
    """The HTTP caller disconnected before the answer was ready."""


async def _first_of(main: Awaitable, watch: Awaitable) -> Any:
    """Runs `main` until it ends or `watch` does (then main is cancelled and CallerGone raised)."""
    task, watcher = asyncio.ensure_future(main), asyncio.ensure_future(watch)
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, watcher):
            t.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    if task.cancelled():
        raise CallerGone()
    return task.result()


class Gateway:
    def __init__(self, config: GatewayConfig):
        self.config = config
        self.client: AsyncClient | None = None
        self.info: ModelInfo | None = None

    @contextlib.asynccontextmanager
    async def lifespan(self, _app):
        tls = TLS(ca_file=self.config.upstream_ca) if self.config.upstream_ca else None
        # No retries: a caller of an HTTP API retries itself, and a hidden wait would hold its
        # connection; UNAVAILABLE becomes a 503 at once.
        self.client = AsyncClient(self.config.upstream, tls=tls, timeout=self.config.request_timeout,
                                  retry=NO_RETRY)
        try:
            yield
        finally:
            await self.client.close()

    # -- helpers -------------------------------------------------------------------------------

    def _authorize(self, request: Request) -> tuple[tuple[str, str], ...]:
        """The metadata to forward upstream; raises 401 when a key is set and not presented."""
        header = request.headers.get("authorization", "")
        key = self.config.api_key
        if key:
            scheme, _, presented = header.partition(" ")
            presented = presented.strip().encode()
            if scheme.lower() != "bearer" or not hmac.compare_digest(presented, key.encode()):
                raise ApiError(401, "Incorrect or missing API key: send `Authorization: Bearer KEY`",
                               "invalid_request_error", code="invalid_api_key")
        return (("authorization", header),) if header else ()

    async def _model_info(self, metadata) -> ModelInfo:
        if self.info is None:
            assert self.client is not None
            try:
                self.info = await self.client.model_info(metadata=metadata)
            except SarathiError as e:
                raise ApiError.from_grpc(e.code, e.details) from None
        return self.info

    @staticmethod
    async def _json(request: Request) -> Any:
        try:
            return json.loads(await request.body())
        except ValueError as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None

    # -- routes --------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        assert self.client is not None
        try:
            status = await self.client.health(timeout=2)
        except SarathiError as e:
            status = f"unreachable ({e.code_name})"
        ok = status == "SERVING"
        return JSONResponse({"status": "ok" if ok else "unavailable", "upstream": status},
                            status_code=200 if ok else 503)

    async def models(self, request: Request) -> Response:
        try:
            info = await self._model_info(self._authorize(request))
        except ApiError as e:
            return error_response(e)
        return JSONResponse({"object": "list", "data": [{
            "id": info.model, "object": "model", "created": 0, "owned_by": "sarathi",
            "max_model_len": info.max_model_len}]})

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def _generate(self, request: Request, chat: bool) -> Response:
        try:
            metadata = self._authorize(request)
            parsed = (parse_chat if chat else parse_completion)(await self._json(request))
            info = await self._model_info(metadata)
        except ApiError as e:
            return error_response(e)
        responder = Responder(chat, info.model)
        assert self.client is not None
        deltas = self.client.generate(**parsed.kwargs, request_id=responder.id, metadata=metadata)
        if parsed.stream:
            return await self._stream(request, parsed, responder, deltas)
        try:
            completion = await _first_of(_collect(deltas), _disconnected(request.receive))
            return JSONResponse(responder.whole(completion))
        except CallerGone:
            return Response(status_code=499)  # nobody reads it; the upstream call is cancelled
        except SarathiError as e:
            return error_response(ApiError.from_grpc(e.code, e.details))
        except ApiError as e:
            return error_response(e)
        finally:
            await deltas.aclose()  # type: ignore[attr-defined]

    async def _stream(self, request: Request, parsed: Parsed, responder: Responder,
                      deltas: AsyncIterator[Delta]) -> Response:
        # The first delta decides the status: an upstream error before it is an HTTP error.
        try:
            first = await _first_of(deltas.__anext__(), _disconnected(request.receive))
        except SarathiError as e:
            await deltas.aclose()  # type: ignore[attr-defined]
            return error_response(ApiError.from_grpc(e.code, e.details))
        except CallerGone:
            await deltas.aclose()  # type: ignore[attr-defined]
            return Response(status_code=499)
        except BaseException:
            await deltas.aclose()  # type: ignore[attr-defined]
            raise

        async def events() -> AsyncIterator[bytes]:
            try:
                opening = responder.first_chunk()
                if opening is not None:
                    yield event(opening)
                delta: Delta | None = first
                while delta is not None:
                    if delta.finish_reason is None:
                        if delta.text:  # (a token that completes no character yet sends nothing)
                            yield responder.token_event(delta.text)
                    else:
                        yield event(responder.final_chunk(delta))
                    if delta.usage is not None and parsed.include_usage:
                        yield event(responder.usage_chunk(delta.usage))
                    delta = await anext(deltas, None)
                yield event("[DONE]")
            except SarathiError as e:
                yield event(ApiError.from_grpc(e.code, e.details).body())
            except ApiError as e:
                yield event(e.body())
            finally:
                await deltas.aclose()  # type: ignore[attr-defined]

        return EventStream(events())


async def _collect(deltas: AsyncIterator[Delta]) -> Completion:
    collector = Collector(time.monotonic())
    async for delta in deltas:
        collector.add(delta, time.monotonic())
    return collector.result()


async def _not_found(request: Request, exc: HTTPException) -> Response:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return error_response(ApiError(exc.status_code, message, kind))


def create_app(config: GatewayConfig) -> Starlette:
    gateway = Gateway(config)
    routes = [
        Route("/health", gateway.health, methods=["GET"]),
        Route("/v1/models", gateway.models, methods=["GET"]),
        Route("/v1/completions", gateway.completions, methods=["POST"]),
        Route("/v1/chat/completions", gateway.chat_completions, methods=["POST"]),
    ]
    return Starlette(routes=routes, lifespan=gateway.lifespan, exception_handlers={HTTPException: _not_found})

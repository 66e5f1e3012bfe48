"""The asyncio client (grpc.aio)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import generation_pb2 as pb
from protos import generation_pb2_grpc
from sarathi.client.errors import DeadlineExceeded, from_rpc_error
from sarathi.client.messages import TLS as TLSSettings
from sarathi.client.messages import (
    Collector,
    Completion,
    Delta,
    Message,
    ModelInfo,
    Retry,
    auth_metadata,
    build_request,
    channel_options,
    model_info,
    tls_settings,
    to_delta,
)


class AsyncClient:
    """Client's asyncio twin; create it inside the running event loop:

        async with AsyncClient("127.0.0.1:50051") as client:
            async for delta in client.generate("Once upon a time", max_tokens=16):
                print(delta.text, end="")
            answer = await client.complete(messages=[{"role": "user", "content": "Hi!"}])

    Cancelling the task that iterates a stream (or closing the iterator) cancels the call."""

    def __init__(self, address: str, *, token: str | None = None, tls: bool | TLSSettings | None = None,
                 timeout: float | None = None, retry: Retry | None = None):
        self.address = address
        self.timeout = timeout
        self.retry = retry or Retry()
        self.metadata = auth_metadata(token)
        settings = tls_settings(tls)
        options = channel_options(self.retry)
        if settings is None:
            self.channel = grpc.aio.insecure_channel(address, options=options)
        else:
            if settings.server_name:
                options.append(("grpc.ssl_target_name_override", settings.server_name))
            self.channel = grpc.aio.secure_channel(address, settings.credentials(), options=options)
        self._stub = generation_pb2_grpc.GenerationStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_) -> None:
        await self.close()

    async def generate(self, prompt: str | Sequence[int] | None = None, *,
                       messages: Sequence[Message] | None = None, max_tokens: int | None = None,
                       temperature: float | None = None, top_p: float | None = None,
                       top_k: int | None = None, seed: int | None = None,
                       stop: str | Sequence[str] | None = None, stop_token_ids: Sequence[int] | None = None,
                       ignore_eos: bool = False, priority: int = 0, request_id: str = "",
                       timeout: float | None = None,
                       metadata: Sequence[tuple[str, str]] = ()) -> AsyncIterator[Delta]:
        """Streams one answer as Deltas; see Client.generate."""
        request = build_request(prompt, messages=messages, max_tokens=max_tokens, temperature=temperature,
                                top_p=top_p, top_k=top_k, seed=seed, stop=stop,
                                stop_token_ids=stop_token_ids, ignore_eos=ignore_eos, priority=priority,
                                request_id=request_id)
        timeout = self.timeout if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        metadata = self.metadata + tuple(metadata)
        attempt = 1
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceeded(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed while retrying")
            call = self._stub.Generate(request, timeout=remaining, metadata=metadata)
            received = False
            try:
                async for msg in call:
                    received = True
                    yield to_delta(msg)
                return
            except grpc.RpcError as e:
                if received or e.code() != grpc.StatusCode.UNAVAILABLE or attempt >= self.retry.attempts:
                    raise from_rpc_error(e) from None
                wait = self.retry.backoff(attempt)
                if deadline is not None and time.monotonic() + wait >= deadline:
                    raise from_rpc_error(e) from None
                await asyncio.sleep(wait)
                attempt += 1
            finally:
                call.cancel()  # a no-op when the call ended; frees the request when the caller stopped early

    async def complete(self, prompt: str | Sequence[int] | None = None, **kwargs) -> Completion:
        """The whole answer with its usage; takes generate()'s arguments."""
        collector = Collector(time.monotonic())
        stream = self.generate(prompt, **kwargs)
        try:
            async for delta in stream:
                collector.add(delta, time.monotonic())
        finally:
            await stream.aclose()
        return collector.result()

    async def model_info(self, timeout: float | None = 10.0,
                         metadata: Sequence[tuple[str, str]] = ()) -> ModelInfo:
        try:
            return model_info(await self._stub.ModelInfo(pb.ModelInfoRequest(), timeout=timeout,
                                                         metadata=self.metadata + tuple(metadata)))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    async def health(self, timeout: float | None = 5.0) -> str:
        """The server's health status: "SERVING", "NOT_SERVING", ..."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        try:
            response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout,
                                        metadata=self.metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

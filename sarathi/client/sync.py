"""The blocking client."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

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


class Client:
    """A connection to a sarathi scheduler (or router):

        with Client("127.0.0.1:50051") as client:
            for delta in client.generate("The capital of France is", max_tokens=16, temperature=0):
                print(delta.text, end="")
            answer = client.complete(messages=[{"role": "user", "content": "Hi!"}], max_tokens=32)
            print(answer.text, answer.finish_reason, answer.usage.completion_tokens)

    `token` is sent as `authorization: Bearer TOKEN`; `tls` is True (system roots) or a TLS;
    `timeout` is the default deadline of each call in seconds (None: none); `retry` says how
    often a call that meets UNAVAILABLE before its first token is tried again. Failed calls
    raise SarathiError subclasses (sarathi.client.errors)."""

    def __init__(self, address: str, *, token: str | None = None, tls: bool | TLSSettings | None = None,
                 timeout: float | None = None, retry: Retry | None = None):
        self.address = address
        self.timeout = timeout
        self.retry = retry or Retry()
        self.metadata = auth_metadata(token)
        settings = tls_settings(tls)
        options = channel_options(self.retry)
        if settings is None:
            self.channel = grpc.insecure_channel(address, options=options)
        else:
            if settings.server_name:
                options.append(("grpc.ssl_target_name_override", settings.server_name))
            self.channel = grpc.secure_channel(address, settings.credentials(), options=options)
        self._stub = generation_pb2_grpc.GenerationStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def generate(self, prompt: str | Sequence[int] | None = None, *,
                 messages: Sequence[Message] | None = None,
                 max_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
                 top_k: int | None = None, seed: int | None = None, stop: str | Sequence[str] | None = None,
                 stop_token_ids: Sequence[int] | None = None, ignore_eos: bool = False, priority: int = 0,
                 request_id: str = "", timeout: float | None = None,
                 metadata: Sequence[tuple[str, str]] = ()) -> Iterator[Delta]:
        """Streams one answer as Deltas (the last one has finish_reason and usage). The call
        starts at the first next(); stopping early (break, close()) cancels it, and the server
        frees its KV blocks. `timeout` (seconds) bounds the whole stream, retries included."""
        request = build_request(prompt, messages=messages, max_tokens=max_tokens, temperature=temperature,
                                top_p=top_p, top_k=top_k, seed=seed, stop=stop,
                                stop_token_ids=stop_token_ids, ignore_eos=ignore_eos, priority=priority,
                                request_id=request_id)
        return self._stream(request, self.timeout if timeout is None else timeout, tuple(metadata))

    def complete(self, prompt: str | Sequence[int] | None = None, **kwargs) -> Completion:
        """The whole answer with its usage; takes generate()'s arguments."""
        collector = Collector(time.monotonic())
        for delta in self.generate(prompt, **kwargs):
            collector.add(delta, time.monotonic())
        return collector.result()

    def model_info(self, timeout: float | None = 10.0,
                   metadata: Sequence[tuple[str, str]] = ()) -> ModelInfo:
        try:
            return model_info(self._stub.ModelInfo(pb.ModelInfoRequest(), timeout=timeout,
                                                   metadata=self.metadata + tuple(metadata)))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def health(self, timeout: float | None = 5.0) -> str:
        """The server's health status: "SERVING", "NOT_SERVING", ..."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        try:
            status = stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout,
                                metadata=self.metadata).status
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(status)

    def _stream(self, request: pb.GenerateRequest, timeout: float | None,
                metadata: tuple[tuple[str, str], ...]) -> Iterator[Delta]:
        deadline = None if timeout is None else time.monotonic() + timeout
        attempt = 1
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceeded(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed while retrying")
            call = self._stub.Generate(request, timeout=remaining, metadata=self.metadata + metadata)
            received = False
            try:
                for msg in call:
                    received = True
                    yield to_delta(msg)
                return
            except grpc.RpcError as e:
                if received or e.code() != grpc.StatusCode.UNAVAILABLE or attempt >= self.retry.attempts:
                    raise from_rpc_error(e) from None
                wait = self.retry.backoff(attempt)
                if deadline is not None and time.monotonic() + wait >= deadline:
                    raise from_rpc_error(e) from None
                time.sleep(wait)
                attempt += 1
            finally:
                call.cancel()  # a no-op when the call ended; frees the request when the caller stopped early

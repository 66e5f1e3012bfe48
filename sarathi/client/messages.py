"""What both clients share: the request builder, the result types, connection settings and the
retry policy. Nothing here does I/O."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from protos import generation_pb2 as pb

# A chat message: {"role": ..., "content": ...} or a (role, content) pair.
Message = Mapping[str, str] | tuple[str, str]


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Delta:
    """One streamed message: the text and token ids added since the previous delta. The last
    delta of a stream has `finish_reason` ("stop", "length" or "abort") and `usage` set; its text
    is what the server held back (often empty) and it has no token ids."""

    text: str
    token_ids: tuple[int, ...] = ()
    finish_reason: str | None = None
    usage: Usage | None = None
    scheduling_delay_s: float | None = None


@dataclass(frozen=True)
class Completion:
    """A whole answer: `complete()`'s result."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    usage: Usage
    time_to_first_token_s: float | None = None
    scheduling_delay_s: float | None = None


@dataclass(frozen=True)
class ModelInfo:
    model: str
    max_model_len: int
    vocab_size: int
    has_tokenizer: bool
    block_size: int
    num_kv_blocks: int
    dtype: str
    device: str
    eos_token_ids: tuple[int, ...]


@dataclass(frozen=True)
class TLS:
    """TLS settings. `ca_file`: PEM roots to trust (None: the system's); `cert_file` and
    `key_file`: a client certificate for mutual TLS; `server_name`: the name to check the
    server's certificate against when it differs from the address's host."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: str | None) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return grpc.ssl_channel_credentials(read(self.ca_file), read(self.key_file), read(self.cert_file))


@dataclass(frozen=True)
class Retry:
    """Retries of a call that fails with UNAVAILABLE before its first token (no server yet, a
    worker still loading); never after a token arrived, never for other statuses. `attempts`
    counts the first one; waits grow from `initial_backoff` by `multiplier` up to `max_backoff`
    seconds, each randomised to between half and all of it, and never past the call's deadline."""

    attempts: int = 4
    initial_backoff: float = 0.2
    max_backoff: float = 2.0
    multiplier: float = 2.0

    def backoff(self, retry: int) -> float:
        """The wait before retry number `retry` (1 for the first retry)."""
        base = min(self.max_backoff, self.initial_backoff * self.multiplier ** (retry - 1))
        return base * random.uniform(0.5, 1.0)


NO_RETRY = Retry(attempts=1)


def channel_options(retry: Retry) -> list[tuple[str, int]]:
    """gRPC's own reconnect backoff grows to 2 minutes by default: a channel that failed to
    connect would not try again in time for our retries. Cap it at the retry policy's."""
    return [("grpc.initial_reconnect_backoff_ms", max(100, int(retry.initial_backoff * 1000))),
            ("grpc.min_reconnect_backoff_ms", max(100, int(retry.initial_backoff * 1000))),
            ("grpc.max_reconnect_backoff_ms", max(100, int(retry.max_backoff * 1000)))]


def tls_settings(tls: bool | TLS | None) -> TLS | None:
    if tls is True:
        return TLS()
    return tls or None


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def build_request(prompt: str | Sequence[int] | None = None, *, messages: Sequence[Message] | None = None,
                  max_tokens: int | None = None, temperature: float | None = None,
                  top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
                  stop: str | Sequence[str] | None = None, stop_token_ids: Sequence[int] | None = None,
                  ignore_eos: bool = False, priority: int = 0, request_id: str = "") -> pb.GenerateRequest:
    """The GenerateRequest for a text prompt (`str`), token ids (a sequence of ints) or chat
    `messages` (the server applies the model's chat template). Unset sampling fields take the
    server's defaults (max_tokens 16, temperature 1.0, top_p 1.0)."""
    if (prompt is None) == (messages is None):
        raise ValueError("pass either a prompt (text or token ids) or messages, not both")
    sampling = pb.SamplingParams(top_k=top_k or 0, ignore_eos=ignore_eos)
    for name, value in (("max_tokens", max_tokens), ("temperature", temperature), ("top_p", top_p),
                        ("seed", seed)):
        if value is not None:
            setattr(sampling, name, value)
    if stop:
        sampling.stop.extend([stop] if isinstance(stop, str) else stop)
    if stop_token_ids:
        sampling.stop_token_ids.extend(stop_token_ids)
    request = pb.GenerateRequest(sampling=sampling, priority=priority, request_id=request_id)
    if messages is not None:
        for m in messages:
            role, content = (m["role"], m["content"]) if isinstance(m, Mapping) else m
            request.chat.messages.add(role=role, content=content)
    elif isinstance(prompt, str):
        request.text = prompt
    else:
        request.token_ids.ids.extend(prompt)
    return request


def finish_reason_name(reason: int) -> str:
    """"stop", "length", "abort" (or "unspecified") for a FinishReason value."""
    try:
        name = pb.FinishReason.Name(reason)
    except ValueError:
        return "unspecified"
    return name.removeprefix("FINISH_REASON_").lower()


def to_delta(msg: pb.GenerateResponse) -> Delta:
    if msg.HasField("chunk"):
        return Delta(msg.chunk.text, tuple(msg.chunk.token_ids))
    f = msg.finished
    return Delta(f.text, (), finish_reason_name(f.reason),
                 Usage(f.usage.prompt_tokens, f.usage.completion_tokens), f.scheduling_delay_ns / 1e9)


class Collector:
    """Adds deltas up into a Completion."""

    def __init__(self, start: float):
        self.start = start
        self.first: float | None = None
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.last: Delta | None = None

    def add(self, delta: Delta, now: float) -> None:
        if delta.token_ids and self.first is None:
            self.first = now - self.start
        self.text.append(delta.text)
        self.token_ids += delta.token_ids
        self.last = delta

    def result(self) -> Completion:
        last = self.last
        if last is None or last.finish_reason is None or last.usage is None:
            raise RuntimeError("the stream ended without its final message")
        return Completion("".join(self.text), tuple(self.token_ids), last.finish_reason, last.usage,
                          self.first, last.scheduling_delay_s)


def model_info(r: pb.ModelInfoResponse) -> ModelInfo:
    return ModelInfo(r.model, r.max_model_len, r.vocab_size, r.has_tokenizer, r.block_size,
                     r.num_kv_blocks, r.dtype, r.device, tuple(r.eos_token_ids))

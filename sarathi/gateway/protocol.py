"""The OpenAI wire format: request bodies to the client library's arguments, results to response
and chunk bodies, gRPC statuses to HTTP errors. Pure functions, no I/O.

Ranges (temperature >= 0, top_p in (0, 1], max_tokens >= 1, the context length) are checked by
the scheduler, one place for every client; here only shapes and types, and what the API has that
this server does not do (n > 1, logprobs, penalties, tools, ...), which is refused by name."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from sarathi.client import Completion, Delta, Usage

# HTTP status and OpenAI error type of each gRPC status the upstream may return.
HTTP_OF_GRPC: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "conflict_error"),
    grpc.StatusCode.ABORTED: (409, "conflict_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "server_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}


class ApiError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @classmethod
    def from_grpc(cls, code: grpc.StatusCode, details: str) -> ApiError:
        status, kind = HTTP_OF_GRPC.get(code, (500, "server_error"))
        return cls(status, details or code.name, kind, code=code.name.lower())


def bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


@dataclass(frozen=True)
class Parsed:
    """A request body, understood: the client library's generate() arguments and how to answer."""

    kwargs: dict[str, Any]
    stream: bool
    include_usage: bool
    model: str | None


# Fields of the API this server does not implement: refused unless left at their neutral value.
_UNSUPPORTED = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}), "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
    "function_call": (None, "none"), "response_format": (None, {"type": "text"}), "audio": (None,),
    "modalities": (None, ["text"]), "prediction": (None,), "parallel_tool_calls": (None, False, True),
}


def _number(body: Mapping, name: str, kind: type) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise bad(f"'{name}' must be {'a number' if kind is float else 'an integer'}, not {value!r}", name)
    return kind(value)


def _sampling(body: Mapping) -> dict[str, Any]:
    for name, neutral in _UNSUPPORTED.items():
        if name in body and body[name] not in neutral:
            raise bad(f"'{name}' is not supported by this server", name)
    n = body.get("n")
    if n is not None and n != 1:
        raise bad("only n=1 is supported: send one request per completion", "n")
    max_tokens = _number(body, "max_completion_tokens", int)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", int)
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or
                                 (isinstance(stop, list) and all(isinstance(s, str) for s in stop))):
        raise bad("'stop' must be a string or a list of strings", "stop")
    kwargs: dict[str, Any] = {
        "max_tokens": max_tokens, "temperature": _number(body, "temperature", float),
        "top_p": _number(body, "top_p", float), "seed": _number(body, "seed", int), "stop": stop,
        # Extensions (as vLLM names them), for callers that pass them in extra_body.
        "top_k": _number(body, "top_k", int),
        "priority": _number(body, "priority", int) or 0,
    }
    if kwargs["seed"] is not None and kwargs["seed"] < 0:
        kwargs["seed"] %= 2 ** 64  # the API's seeds are signed; the server's are uint64
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise bad("'ignore_eos' must be true or false", "ignore_eos")
    kwargs["ignore_eos"] = ignore_eos
    stop_ids = body.get("stop_token_ids")
    if stop_ids is not None:
        if not (isinstance(stop_ids, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                   for i in stop_ids)):
            raise bad("'stop_token_ids' must be a list of token ids", "stop_token_ids")
        kwargs["stop_token_ids"] = stop_ids
    return kwargs


def _stream_options(body: Mapping) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, Mapping):
        raise bad("'stream_options' must be an object", "stream_options")
    return stream, bool(options.get("include_usage", False))


def _model(body: Mapping) -> str | None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("'model' must be a string", "model")
    return model


def _token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(i, int) and not isinstance(i, bool) for i in value)


def parse_completion(body: Any) -> Parsed:
    """POST /v1/completions: `prompt` is a string or token ids (one prompt per request)."""
    if not isinstance(body, Mapping):
        raise bad("the request body must be a JSON object")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and (isinstance(prompt[0], str)
                                                          or _token_ids(prompt[0])):
        prompt = prompt[0]
    if not (isinstance(prompt, str) or _token_ids(prompt)):
        if isinstance(prompt, list) and len(prompt) > 1 and not _token_ids(prompt):
            raise bad("one prompt per request: send a string or a list of token ids", "prompt")
        raise bad("'prompt' must be a string or a list of token ids", "prompt")
    stream, include_usage = _stream_options(body)
    return Parsed({"prompt": prompt, **_sampling(body)}, stream, include_usage, _model(body))


_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _content(message: Mapping, i: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: text only
        texts = []
        for part in content:
            if not (isinstance(part, Mapping) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise bad("only text content parts are supported", f"messages[{i}].content")
            texts.append(part["text"])
        return "".join(texts)
    raise bad("each message needs a 'content' string", f"messages[{i}].content")


def parse_chat(body: Any) -> Parsed:
    """POST /v1/chat/completions: the scheduler applies the model's chat template."""
    if not isinstance(body, Mapping):
        raise bad("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "messages")
    converted = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise bad("each message must be an object with 'role' and 'content'", f"messages[{i}]")
        role = _ROLES.get(m.get("role"))  # type: ignore[arg-type]
        if role is None:
            raise bad(f"unsupported role {m.get('role')!r}: use system, user or assistant",
                      f"messages[{i}].role")
        converted.append({"role": role, "content": _content(m, i)})
    stream, include_usage = _stream_options(body)
    return Parsed({"messages": converted, **_sampling(body)}, stream, include_usage, _model(body))


def event(body: dict | str) -> bytes:
    """One server-sent event."""
    data = body if isinstance(body, str) else json.dumps(body, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def _usage(usage: Usage) -> dict:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens}


def finish_reason(reason: str) -> str:
    """OpenAI's finish reasons are "stop" and "length"; an abort never gets here (it is an error)."""
    return "length" if reason == "length" else "stop"


def aborted() -> ApiError:
    return ApiError(503, "the server aborted the request (its worker failed or restarted); retry it",
                    "service_unavailable", code="aborted")


class Responder:
    """Builds the bodies of one response (the same id and creation time in each chunk)."""

    def __init__(self, chat: bool, model: str):
        self.chat = chat
        self.model = model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        # A token's event is most of a stream: its bytes around the text are made once.
        kind = "chat.completion.chunk" if chat else "text_completion"
        head = json.dumps(self._envelope(kind), separators=(",", ":"))[:-1]
        field = '"delta":{"content":' if chat else '"text":'
        self._token_head = f'data: {head},"choices":[{{"index":0,{field}'.encode()
        self._token_tail = ('}' if chat else '') + ',"logprobs":null,"finish_reason":null}]}\n\n'
        self._token_tail_bytes = self._token_tail.encode()

    def _envelope(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def whole(self, completion: Completion) -> dict:
        if completion.finish_reason == "abort":
            raise aborted()
        reason = finish_reason(completion.finish_reason)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": completion.text},
                      "logprobs": None, "finish_reason": reason}
            body = self._envelope("chat.completion")
        else:
            choice = {"index": 0, "text": completion.text, "logprobs": None, "finish_reason": reason}
            body = self._envelope("text_completion")
        return {**body, "choices": [choice], "usage": _usage(completion.usage)}

    def chunk(self, text: str | None, reason: str | None = None, first: bool = False) -> dict:
        """One streamed chunk: new text, or the last one with the finish reason."""
        if self.chat:
            delta: dict[str, str] = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            return {**self._envelope("chat.completion.chunk"), "choices": [choice]}
        return {**self._envelope("text_completion"),
                "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}]}

    def first_chunk(self) -> dict | None:
        """Chat streams open with the assistant's role (as OpenAI's do)."""
        return self.chunk("", first=True) if self.chat else None

    def token_event(self, text: str) -> bytes:
        """The event of one chunk of new text: `event(self.chunk(text))`, made faster."""
        return self._token_head + json.dumps(text).encode() + self._token_tail_bytes

    def final_chunk(self, delta: Delta) -> dict:
        """The last chunk: the held-back text (if any) and the finish reason."""
        if delta.finish_reason == "abort":
            raise aborted()
        text = (delta.text or None) if self.chat else delta.text
        return self.chunk(text, finish_reason(delta.finish_reason or "stop"))

    def usage_chunk(self, usage: Usage) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._envelope(kind), "choices": [], "usage": _usage(usage)}

"""The client commands: `sarathi generate` (one streamed answer) and `sarathi chat` (an interactive
conversation), on the client library. Errors end in one line that says what to do."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import TextIO

from sarathi.client import (
    TLS,
    Client,
    Completion,
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    Retry,
    SarathiError,
    Unauthenticated,
    Unavailable,
)
from sarathi.client.messages import Collector
from sarathi_common.options import option

TOKEN_ENV = "SARATHI_TOKEN"


@dataclass(frozen=True)
class ConnectionConfig:
    """How the client commands reach a server."""

    address: str = option("127.0.0.1:50051", "the server's gRPC address (HOST:PORT)")
    token: str | None = option(None, f"bearer token sent as `authorization` metadata (default: ${TOKEN_ENV})")
    tls: bool = option(False, "connect with TLS, trusting the system's root certificates")
    ca_file: str | None = option(None, "connect with TLS, trusting the certificates in this PEM file")
    timeout: float | None = option(None, "give up on an answer after this many seconds (default: never)")

    def client(self, retry: Retry | None = None) -> Client:
        tls = TLS(ca_file=self.ca_file) if self.ca_file else self.tls
        return Client(self.address, token=self.token or os.environ.get(TOKEN_ENV) or None, tls=tls,
                      timeout=self.timeout, retry=retry)


def explain(error: SarathiError, config: ConnectionConfig) -> str:
    """One line that says what went wrong and what to do."""
    details = error.details.strip()
    if isinstance(error, Unavailable):
        if "failed to connect" in details.lower() or "dns resolution failed" in details.lower():
            return (f"no server answers at {config.address}: start one with `sarathi serve` "
                    "(or pass --address HOST:PORT of a running one)")
        return f"the server at {config.address} is not serving yet ({details}); try again in a moment"
    if isinstance(error, DeadlineExceeded):
        limit = f"within --timeout {config.timeout:g} s" if config.timeout else "in time"
        return f"no complete answer {limit}: raise --timeout or lower --max-tokens"
    if isinstance(error, Unauthenticated):
        return f"the server refused the token ({details}): pass --token or set ${TOKEN_ENV}"
    if isinstance(error, InvalidArgument):
        return f"the server refused the request: {details}"
    if isinstance(error, ResourceExhausted):
        return f"the server cannot take this request now: {details} (lower --max-tokens or retry later)"
    return f"the call failed with {error.code_name}: {details}"


def finish_line(completion: Completion) -> str:
    """`[stop; 12 prompt + 30 completion tokens]`."""
    return (f"[{completion.finish_reason}; {completion.usage.prompt_tokens} prompt + "
            f"{completion.usage.completion_tokens} completion tokens]")


def speed_line(completion: Completion, elapsed: float) -> str:
    """`[stop; 30 tokens, 21.4 tokens/s, first token 180 ms]`: tokens/s over the decode part."""
    n = completion.usage.completion_tokens
    ttft = completion.time_to_first_token_s
    parts = [completion.finish_reason, f"{n} tokens"]
    if ttft is not None and n > 1 and elapsed > ttft:
        parts.append(f"{(n - 1) / (elapsed - ttft):.1f} tokens/s")
    if ttft is not None:
        parts.append(f"first token {ttft * 1000:.0f} ms")
    return "[" + "; ".join(parts) + "]"


def stream_answer(client: Client, out: TextIO = sys.stdout, **request) -> tuple[Completion, float]:
    """Prints one answer as it streams; returns it and the seconds it took."""
    start = time.monotonic()
    collector = Collector(start)
    stream = client.generate(**request)
    try:
        for delta in stream:
            collector.add(delta, time.monotonic())
            out.write(delta.text)
            out.flush()
    except BaseException:
        if any(collector.text):
            out.write("\n")  # the error goes on a line of its own
        raise
    finally:
        stream.close()
    out.write("\n")
    return collector.result(), time.monotonic() - start


def run_generate(config: ConnectionConfig, prompt: str, chat: bool, system: str | None, **sampling) -> int:
    try:
        with config.client() as client:
            if chat:
                messages = ([{"role": "system", "content": system}] if system else []) + \
                    [{"role": "user", "content": prompt}]
                completion, _ = stream_answer(client, messages=messages, **sampling)
            else:
                completion, _ = stream_answer(client, prompt=prompt, **sampling)
    except SarathiError as e:
        print(f"error: {explain(e, config)}", file=sys.stderr)
        return 1
    print(finish_line(completion), file=sys.stderr)
    return 0


HELP = "/reset starts a new conversation, /exit (or Ctrl-D) quits, Ctrl-C stops an answer"


def run_chat(config: ConnectionConfig, system: str | None, **sampling) -> int:
    """An interactive conversation: each turn sends the whole conversation so far."""
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass
    dim = (lambda s: f"\x1b[2m{s}\x1b[0m") if sys.stderr.isatty() else (lambda s: s)
    with config.client(retry=Retry(attempts=1)) as client:
        try:
            info = client.model_info(timeout=config.timeout or 10)
        except SarathiError as e:
            print(f"error: {explain(e, config)}", file=sys.stderr)
            return 1
        print(dim(f"sarathi chat with {info.model} at {config.address} ({HELP})"), file=sys.stderr)
        first = [{"role": "system", "content": system}] if system else []
        history = list(first)
        while True:
            try:
                line = input("> ")
            except (EOFError, KeyboardInterrupt):
                print(file=sys.stderr)
                return 0
            line = line.strip()
            if not line:
                continue
            if line in ("/exit", "/quit"):
                return 0
            if line == "/reset":
                history = list(first)
                print(dim("[a new conversation]"), file=sys.stderr)
                continue
            history.append({"role": "user", "content": line})
            answer = _turn(client, config, history, sampling, dim)
            if answer is None:
                history.pop()  # the server refused it: let the user rephrase or /reset
            else:
                history.append({"role": "assistant", "content": answer})


def _turn(client: Client, config: ConnectionConfig, history: list[dict], sampling: dict, dim) -> str | None:
    """One answer, streamed; returns its text (what was shown, if stopped) or None on an error."""
    start = time.monotonic()
    collector = Collector(start)
    stream = client.generate(messages=history, **sampling)
    try:
        for delta in stream:
            collector.add(delta, time.monotonic())
            sys.stdout.write(delta.text)
            sys.stdout.flush()
    except KeyboardInterrupt:
        stream.close()
        print(dim("\n[stopped]"), file=sys.stderr)
        return "".join(collector.text)
    except SarathiError as e:
        hint = " (/reset starts a shorter conversation)" if isinstance(e, InvalidArgument) else ""
        newline = "\n" if any(collector.text) else ""
        print(f"{newline}error: {explain(e, config)}{hint}", file=sys.stderr)
        return None
    finally:
        stream.close()
    print()
    completion = collector.result()
    print(dim(speed_line(completion, time.monotonic() - start)), file=sys.stderr)
    return completion.text

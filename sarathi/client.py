"""Client helpers over the generated gRPC stubs: stream one answer, wait for a server to serve.
The CLI, the tests and the benchmarks use them (the clients issue grows this into a library)."""

from __future__ import annotations

import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import generation_pb2, generation_pb2_grpc


def generate(address: str, prompt: str, chat: bool, max_tokens: int, temperature: float,
             seed: int | None, stop: list[str], out=sys.stdout) -> tuple[float | None, object]:
    """Streams one answer to `out`; returns (seconds to first token, the Finished message)."""
    params = generation_pb2.SamplingParams(max_tokens=max_tokens, temperature=temperature, stop=stop)
    if seed is not None:
        params.seed = seed
    req = generation_pb2.GenerateRequest(sampling=params)
    if chat:
        req.chat.messages.add(role="user", content=prompt)
    else:
        req.text = prompt
    start = time.monotonic()
    first = None
    finished = None
    with grpc.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        for msg in stub.Generate(req):
            if msg.HasField("chunk"):
                if first is None:
                    first = time.monotonic() - start
                out.write(msg.chunk.text)
                out.flush()
            else:
                finished = msg.finished
                out.write(finished.text + "\n")
    return first, finished


def finish_line(finished) -> str:
    """`[stop; 12 prompt + 30 completion tokens]` for a Finished message."""
    reason = generation_pb2.FinishReason.Name(finished.reason).removeprefix("FINISH_REASON_").lower()
    return (f"[{reason}; {finished.usage.prompt_tokens} prompt + "
            f"{finished.usage.completion_tokens} completion tokens]")


def wait_serving(address: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise SystemExit(f"the server exited with code {proc.returncode} before serving")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise SystemExit(f"the server at {address} was not SERVING within {timeout:.0f} s")

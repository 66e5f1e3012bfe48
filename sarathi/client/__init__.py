"""The Python client of the `sarathi.v1.Generation` API, blocking (Client) and asyncio
(AsyncClient), over the generated gRPC stubs:

    from sarathi.client import Client

    with Client("127.0.0.1:50051") as client:
        answer = client.complete("The capital of France is", max_tokens=16, temperature=0)
        print(answer.text, answer.finish_reason, answer.usage)

Results are plain dataclasses (Delta, Completion, Usage) with enums as names ("stop", "length",
"abort"); failures raise SarathiError subclasses carrying the gRPC status code. It needs grpcio
and the generated stubs only (no torch)."""

from __future__ import annotations

import subprocess
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sarathi.client.aio import AsyncClient
from sarathi.client.errors import (
    Cancelled,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    SarathiError,
    Unauthenticated,
    Unavailable,
)
from sarathi.client.messages import NO_RETRY, TLS, Completion, Delta, ModelInfo, Retry, Usage, build_request
from sarathi.client.sync import Client

__all__ = [
    "AsyncClient", "Client", "Completion", "Delta", "ModelInfo", "Retry", "NO_RETRY", "TLS", "Usage",
    "build_request", "wait_serving", "SarathiError", "Cancelled", "DeadlineExceeded", "Internal",
    "InvalidArgument", "PermissionDenied", "ResourceExhausted", "Unauthenticated", "Unavailable",
]


def wait_serving(address: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Waits until the server at `address` reports SERVING (exits if `proc` dies first)."""
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

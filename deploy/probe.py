#!/opt/venv/bin/python
"""Liveness probe for every role: is the process still answering gRPC?

    sarathi-probe [PORT]        (default 50051; the worker's is 50061)

Exits 0 when a gRPC health Check on 127.0.0.1:PORT gets any answer within the timeout:
SERVING, NOT_SERVING (a scheduler waiting for a worker must not be restarted: that cures
nothing) or UNIMPLEMENTED (the worker has no health service; its server still answered).
Exits 1 when the call times out or the port refuses: a hung or wedged process that the
orchestrator should restart. Kubernetes' own `grpc:` probe fails on NOT_SERVING, so it serves
readiness, and this one liveness. Plain gRPC only: a port served over TLS fails here.
"""

import os
import sys

import grpc

ALIVE = {grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED}


def main() -> int:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 50051
    timeout = float(os.environ.get("SARATHI_PROBE_TIMEOUT", "5"))
    # IPv6 loopback first would fail on an IPv4-only pod; "localhost" lets the resolver choose.
    with grpc.insecure_channel(f"localhost:{port}") as channel:
        # An empty HealthCheckRequest is zero bytes: no protobuf stubs needed (a fast start).
        check = channel.unary_unary("/grpc.health.v1.Health/Check")
        try:
            check(b"", timeout=timeout, wait_for_ready=False)
        except grpc.RpcError as e:
            if e.code() not in ALIVE:
                print(f"sarathi-probe: localhost:{port}: {e.code().name}", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

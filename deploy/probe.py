#!/opt/venv/bin/python
"""Liveness and readiness probe for every role: is the process still answering?

    sarathi-probe [PORT]            plain gRPC on 127.0.0.1:PORT (default 50051; a worker's 50061)
    sarathi-probe --tls PORT        a port served over TLS, mutual or not: no certificates needed
    sarathi-probe --ready --socket PATH
                                    readiness of a scheduler through its --local-socket

Liveness (the first two) exits 0 when the process answers at all: a gRPC health Check that gets
SERVING, NOT_SERVING (a scheduler waiting for a worker must not be restarted: that cures nothing)
or UNIMPLEMENTED (the worker has no health service; its server still answered); on a TLS port,
the server's side of a TLS handshake (its answer needs the process, where a stopped one's
kernel still accepts the connection). It exits 1 when the call times out or the port refuses:
a hung or wedged process that the orchestrator should restart. Kubernetes' own `grpc:` probe
fails on NOT_SERVING and speaks no TLS, so with TLS on, readiness (health SERVING) goes through
the scheduler's Unix socket instead, which needs no certificates either.
"""

import argparse
import os
import socket
import ssl
import sys

import grpc

ALIVE = {grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED}
SERVING = b"\x08\x01"   # HealthCheckResponse{status: SERVING}, encoded (no stubs: a fast start)


def health_check(target: str, timeout: float) -> bytes | grpc.StatusCode:
    """The raw HealthCheckResponse, or the status code of the failed call."""
    with grpc.insecure_channel(target) as channel:
        # An empty HealthCheckRequest is zero bytes.
        check = channel.unary_unary("/grpc.health.v1.Health/Check")
        try:
            return check(b"", timeout=timeout, wait_for_ready=False)
        except grpc.RpcError as e:
            return e.code()


def tls_answers(port: int, timeout: float) -> bool:
    """True when the server takes part in a TLS handshake: it completes (under TLS 1.3 a
    refused client certificate shows only after it), or the server ends it. False on refusal
    or silence."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE   # liveness, not trust: nothing is sent
    try:
        with socket.create_connection(("localhost", port), timeout=timeout) as raw, \
                context.wrap_socket(raw, server_hostname="localhost"):
            pass
    except (ssl.SSLError, ConnectionResetError):
        return True       # it answered, if only to refuse us
    except OSError:
        return False      # refused, unreachable, or timed out
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description="sarathi's liveness and readiness probe")
    ap.add_argument("port", type=int, nargs="?", default=50051)
    ap.add_argument("--tls", action="store_true", help="the port speaks TLS (liveness only)")
    ap.add_argument("--ready", action="store_true", help="health must be SERVING (readiness)")
    ap.add_argument("--socket", help="a scheduler's --local-socket instead of the port")
    args = ap.parse_args()
    timeout = float(os.environ.get("SARATHI_PROBE_TIMEOUT", "5"))
    where = args.socket or f"localhost:{args.port}"
    if args.tls and not args.socket:
        if tls_answers(args.port, timeout):
            return 0
        print(f"sarathi-probe: {where}: no TLS handshake within {timeout:g} s", file=sys.stderr)
        return 1
    # IPv6 loopback first would fail on an IPv4-only pod; "localhost" lets the resolver choose.
    answer = health_check(f"unix:{args.socket}" if args.socket else where, timeout)
    if isinstance(answer, bytes):
        if not args.ready or answer == SERVING:
            return 0
        print(f"sarathi-probe: {where}: not SERVING", file=sys.stderr)
        return 1
    if answer in ALIVE and not args.ready:
        return 0
    print(f"sarathi-probe: {where}: {answer.name}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())

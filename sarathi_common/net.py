"""Small network helpers both services and their tests use."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port free on loopback right now (the caller binds it soon after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listen(server, host: str, port: int, name: str, credentials=None) -> None:
    """add_insecure_port (add_secure_port with credentials), or exit with one line when the port
    is taken (the servers set grpc.so_reuseport to 0, so a busy port fails here instead of being
    shared)."""
    # gRPC wants an IPv6 host in brackets ("[::]:50051"); `--host ::` (every address, IPv6 and
    # IPv4 where the host is dual-stack) is what a user types.
    address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    try:
        bound = (server.add_secure_port(address, credentials) if credentials is not None
                 else server.add_insecure_port(address))
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise SystemExit(f"{name}: cannot listen on {host}:{port}: the port is in use (or the address is "
                         f"not this host's); pick another with --port")

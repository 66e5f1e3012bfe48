"""Where schedulers come from besides Join: one DNS name that resolves to all of them (a
Kubernetes headless Service answers with every ready pod's address), looked up again every few
seconds so that schedulers added or removed are followed."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket

from router_service.pool import DNS, Pool

log = logging.getLogger("sarathi.router")


def parse_dns_target(target: str) -> tuple[str, int]:
    """NAME:PORT -> (NAME, PORT); a one-line error for anything else."""
    name, sep, port = target.rpartition(":")
    if not sep or not name or not port.isdigit() or not 0 < int(port) < 65536:
        raise SystemExit(f"sarathi router: --scheduler-dns {target!r} must be NAME:PORT "
                         f"(e.g. scheduler.sarathi.svc.cluster.local:50051)")
    return name.strip("[]"), int(port)


def format_address(ip: str, port: int) -> str:
    """host:port as gRPC dials it: IPv6 in brackets, a zone index dropped."""
    ip = ip.split("%", 1)[0]
    return f"[{ip}]:{port}" if ipaddress.ip_address(ip).version == 6 else f"{ip}:{port}"


async def resolve(name: str, port: int) -> set[str]:
    """Every A and AAAA address of `name`, as host:port."""
    infos = await asyncio.get_running_loop().getaddrinfo(name, port, type=socket.SOCK_STREAM)
    return {format_address(info[4][0], port) for info in infos}


async def follow_dns(pool: Pool, name: str, port: int, interval: float) -> None:
    """Keeps the pool's DNS members equal to the latest answer. A failed look-up keeps the
    previous answer (a resolver hiccup should not empty the pool); a name that no longer exists
    (NXDOMAIN: a Service with no ready pods) empties it."""
    while True:
        try:
            addresses = await resolve(name, port)
        except socket.gaierror as e:
            if e.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
                addresses = set()
            else:
                log.warning("looking up %s failed (%s): keeping %d schedulers", name, e,
                            sum(DNS in m.sources for m in pool.members.values()))
                await asyncio.sleep(interval)
                continue
        pool.set_source(DNS, addresses)
        await asyncio.sleep(interval)


async def expire_joins(pool: Pool, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        pool.expire_joins()

"""A scheduler started with `--router HOST:PORT` announces itself to that router every
JOIN_INTERVAL_S (RouterMembership.Join, protos/router.proto), like a worker to its scheduler: a
restarted router learns it back, and when it stops (drains, dies) the router lets it go."""

from __future__ import annotations

import asyncio
import logging

import grpc

from protos import router_pb2, router_pb2_grpc
from scheduler_service.config import SchedulerConfig

log = logging.getLogger("sarathi.frontend")
JOIN_INTERVAL_S = 2.0


async def announce(config: SchedulerConfig) -> None:
    """Runs until cancelled (when the scheduler starts draining)."""
    assert config.router
    address = config.advertised_address()
    internal = config.internal_tls()
    channel = (grpc.aio.secure_channel(config.router, internal.channel_credentials()) if internal
               else grpc.aio.insecure_channel(config.router))
    stub = router_pb2_grpc.RouterMembershipStub(channel)
    joined = False
    try:
        while True:
            try:
                await stub.Join(router_pb2.RouterJoinRequest(address=address), timeout=5)
                if not joined:
                    log.info("joined the router at %s as %s", config.router, address)
                joined = True
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                    log.warning("%s is not a router's join port (`sarathi router --join-port`)",
                                config.router)
                elif joined or e.code() != grpc.StatusCode.UNAVAILABLE:
                    log.warning("the router at %s: %s %s", config.router, e.code().name, e.details())
                joined = False
            await asyncio.sleep(JOIN_INTERVAL_S)
    finally:
        await channel.close()

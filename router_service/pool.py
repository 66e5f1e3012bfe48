"""The schedulers behind the router: who they are, which are in rotation, what each has
outstanding.

A scheduler is a member while any source names it: the static list, the latest DNS answer, or a
Join within the last --join-ttl seconds. Each member gets one channel and a health loop (a Check
every --health-interval): refused, failing or NOT_SERVING takes it out of rotation at once, two
checks in a row that time out (a stopped or partitioned host) too; SERVING puts it back. A
forwarded call that finds it unreachable takes it out as well, before the next check. A member
that leaves with streams open keeps its channel until they end.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from router_service.metrics import RouterMetrics
from router_service.placement import Load

log = logging.getLogger("sarathi.router")

STATIC, DNS, JOIN = "static", "dns", "join"
SERVING = health_pb2.HealthCheckResponse.SERVING


@dataclass
class Member:
    address: str
    channel: grpc.aio.Channel
    sources: set[str] = field(default_factory=set)
    serving: bool = False
    removed: bool = False
    last_join: float = 0.0
    work: int = 0
    requests: int = 0
    placed: int = 0
    health_task: asyncio.Task | None = None
    tickets: set[Ticket] = field(default_factory=set)   # its requests in flight

    def load(self) -> Load:
        return Load(work=self.work, requests=self.requests, placed=self.placed)


class Ticket:
    """One request's share of a member's outstanding work, from placement to its end: the
    prompt counts until the first token, each generated token is taken off as it arrives."""

    def __init__(self, pool: Pool, member: Member, prompt_tokens: int, max_tokens: int) -> None:
        self.pool, self.member = pool, member
        self.prompt, self.remaining = prompt_tokens, max_tokens
        member.work += prompt_tokens + max_tokens
        member.requests += 1
        member.placed += 1
        member.tickets.add(self)
        # Called when the member stops answering (a stopped or cut-off host): its streams would
        # otherwise wait for their deadline. The router cancels the call and retries or fails it.
        self.on_lost: Callable[[], None] = lambda: None

    def token(self) -> None:
        m = self.member
        if self.prompt:
            m.work -= self.prompt
            self.prompt = 0
        if self.remaining:
            m.work -= 1
            self.remaining -= 1

    def release(self) -> None:
        m = self.member
        m.work -= self.prompt + self.remaining
        self.prompt = self.remaining = 0
        m.requests -= 1
        m.tickets.discard(self)
        self.pool._released(m)


class Pool:
    def __init__(self, connect: Callable[[str], grpc.aio.Channel], metrics: RouterMetrics,
                 health_interval: float = 1.0, join_ttl: float = 6.0,
                 on_change: Callable[[], None] = lambda: None) -> None:
        self._connect = connect
        self.metrics = metrics
        self.health_interval = health_interval
        self.join_ttl = join_ttl
        self.on_change = on_change
        self.members: dict[str, Member] = {}

    def in_rotation(self) -> dict[str, Member]:
        return {a: m for a, m in self.members.items() if m.serving}

    def loads(self, exclude: set[str]) -> dict[str, Load]:
        return {a: m.load() for a, m in self.members.items() if m.serving and a not in exclude}

    def acquire(self, member: Member, prompt_tokens: int, max_tokens: int) -> Ticket:
        self.metrics.placed.labels(member.address).inc()
        ticket = Ticket(self, member, prompt_tokens, max_tokens)
        self._publish_load(member)
        return ticket

    # Membership ----------------------------------------------------------------------------

    def set_source(self, source: str, addresses: set[str]) -> None:
        """`source` names exactly `addresses` now (a DNS answer, the static list)."""
        for address in addresses:
            self._add(address, source)
        for address, member in list(self.members.items()):
            if source in member.sources and address not in addresses:
                self._drop_source(member, source)

    def join(self, address: str) -> bool:
        """A Join from the scheduler at `address`; True when it was a member already."""
        known = address in self.members
        self._add(address, JOIN).last_join = time.monotonic()
        return known

    def expire_joins(self) -> None:
        now = time.monotonic()
        for member in list(self.members.values()):
            if JOIN in member.sources and now - member.last_join > self.join_ttl:
                log.info("scheduler %s stopped announcing itself", member.address)
                self._drop_source(member, JOIN)

    def suspect(self, member: Member, why: str) -> None:
        """A forwarded call could not reach `member`: out of rotation until a check passes."""
        if member.serving:
            log.warning("scheduler %s out of rotation: %s", member.address, why)
            self._set_serving(member, False)

    def _add(self, address: str, source: str) -> Member:
        member = self.members.get(address)
        if member is None:
            member = Member(address, self._connect(address))
            self.members[address] = member
            member.health_task = asyncio.get_running_loop().create_task(self._check_health(member))
            self.metrics.changes.labels("joined").inc()
            log.info("scheduler %s joined (%s)", address, source)
        member.sources.add(source)
        return member

    def _drop_source(self, member: Member, source: str) -> None:
        member.sources.discard(source)
        if member.sources:
            return
        log.info("scheduler %s left", member.address)
        del self.members[member.address]
        member.removed = True
        self.metrics.changes.labels("left").inc()
        if member.health_task is not None:
            member.health_task.cancel()
        self._set_serving(member, False)
        if member.requests == 0:
            asyncio.get_running_loop().create_task(member.channel.close())

    def _released(self, member: Member) -> None:
        self._publish_load(member)
        if member.removed and member.requests == 0:
            asyncio.get_running_loop().create_task(member.channel.close())

    async def close(self) -> None:
        for member in list(self.members.values()):
            if member.health_task is not None:
                member.health_task.cancel()
            await member.channel.close()

    # Health --------------------------------------------------------------------------------

    async def _check_health(self, member: Member) -> None:
        stub = health_pb2_grpc.HealthStub(member.channel)
        timeouts = 0
        while not member.removed:
            try:
                status = (await stub.Check(health_pb2.HealthCheckRequest(),
                                           timeout=max(1.0, self.health_interval))).status
                timeouts = 0
                serving, why = status == SERVING, health_pb2.HealthCheckResponse.ServingStatus.Name(status)
            except grpc.aio.AioRpcError as e:
                # One slow answer on a busy host is no verdict; two in a row are.
                timeouts = timeouts + 1 if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED else 2
                serving, why = member.serving and timeouts < 2, e.code().name
            if serving != member.serving:
                log.info("scheduler %s %s (%s)", member.address,
                         "in rotation" if serving else "out of rotation", why)
                self._set_serving(member, serving)
            if timeouts >= 2 and member.tickets:
                # Not answering at all (NOT_SERVING is a drain: its streams go on). Its streams
                # would hang until their deadlines; a refused one fails them by itself.
                log.warning("scheduler %s stopped answering: giving up its %d streams",
                            member.address, len(member.tickets))
                for ticket in list(member.tickets):
                    ticket.on_lost()
            await asyncio.sleep(self.health_interval)

    def _set_serving(self, member: Member, serving: bool) -> None:
        if member.serving == serving:
            return
        member.serving = serving
        self.metrics.changes.labels("up" if serving else "down").inc()
        self.metrics.in_rotation.set(len(self.in_rotation()))
        self.on_change()

    def _publish_load(self, member: Member) -> None:
        self.metrics.outstanding.labels(member.address).set(member.requests)
        self.metrics.outstanding_tokens.labels(member.address).set(member.work)

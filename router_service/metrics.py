"""Prometheus metrics of the router, served over HTTP at /metrics (one registry per router)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


class RouterMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.in_rotation = Gauge("sarathi_router_schedulers_in_rotation",
                                 "Schedulers taking new requests", registry=r)
        self.changes = Counter("sarathi_router_scheduler_changes",
                               "Schedulers joined, left, up (in rotation) or down", ["change"], registry=r)
        by = ["scheduler"]
        self.placed = Counter("sarathi_router_requests_placed", "Requests sent to each scheduler", by,
                              registry=r)
        self.outstanding = Gauge("sarathi_router_requests_outstanding",
                                 "Requests the router has open at each scheduler", by, registry=r)
        self.outstanding_tokens = Gauge("sarathi_router_tokens_outstanding",
                                        "Estimated prompt tokens not prefilled plus tokens still to "
                                        "generate, at each scheduler", by, registry=r)
        # reason: affinity, least_work, overloaded (affinity yielded to balance).
        self.placements = Counter("sarathi_router_placements", "Placement decisions, by reason",
                                  ["reason"], registry=r)
        self.retries = Counter("sarathi_router_retries", "Requests retried on another scheduler after "
                               "theirs failed before the first token", registry=r)
        # outcome: ok, error (the scheduler's status passed on), unavailable (no scheduler, or
        # lost mid-stream), cancelled (by the client or its deadline).
        self.finished = Counter("sarathi_router_requests_finished", "Requests ended, by outcome",
                                ["outcome"], registry=r)

    def serve(self, host: str, port: int) -> None:
        start_http_server(port, addr=host, registry=self.registry)

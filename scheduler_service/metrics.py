"""Prometheus metrics of the scheduler service, served over HTTP at /metrics.

The engine process reports a stats snapshot with every step; the frontend observes latencies as
clients see them (time to first token, time between tokens). One registry per server, so tests
can run several servers in one process.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                    1.5, 2.0, 3.0, 5.0, 10.0, 30.0)


@dataclass
class EngineStats:
    """A snapshot of the engine after one iteration."""

    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    preemptions_total: int
    iteration_s: float
    num_prefill_tokens: int
    num_decode_tokens: int
    prefix_cache_query_tokens: int = 0   # prompt tokens looked up in the prefix cache
    prefix_cache_hit_tokens: int = 0     # of which found (not recomputed)
    device_busy_s: float = 0.0           # the step's own time on the worker's device
    device_idle_s: float = 0.0           # the device's idle gap before the step


class ServerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.running = Gauge("sarathi_requests_running", "Requests holding KV blocks", registry=r)
        self.waiting = Gauge("sarathi_requests_waiting", "Requests queued or preempted", registry=r)
        self.kv_used = Gauge("sarathi_kv_blocks_used", "KV-cache blocks in use", registry=r)
        self.kv_total = Gauge("sarathi_kv_blocks_total", "KV-cache blocks in all", registry=r)
        self.kv_usage = Gauge("sarathi_kv_cache_usage_ratio", "Share of KV blocks in use", registry=r)
        self.preemptions = Gauge("sarathi_preemptions_total", "Preemptions since start", registry=r)
        self.iteration = Histogram("sarathi_iteration_seconds", "Engine iteration time",
                                   buckets=_LATENCY_BUCKETS, registry=r)
        self.prefill_tokens = Counter("sarathi_prefill_tokens", "Prompt tokens computed", registry=r)
        self.generated = Counter("sarathi_generated_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("sarathi_time_to_first_token_seconds", "Request arrival to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tbt = Histogram("sarathi_time_between_tokens_seconds", "Gap between streamed tokens",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.prefix_query = Gauge("sarathi_prefix_cache_query_tokens_total",
                                  "Prompt tokens looked up in the prefix cache", registry=r)
        self.prefix_hit = Gauge("sarathi_prefix_cache_hit_tokens_total",
                                "Prompt tokens found in the prefix cache", registry=r)
        self.finished = Counter("sarathi_requests_finished", "Requests ended, by reason", ["reason"],
                                registry=r)
        # idle / (idle + busy) over a window is the share of time the device waited for the host.
        self.device_busy = Counter("sarathi_device_busy_seconds", "Worker device time in steps",
                                   registry=r)
        self.device_idle = Counter("sarathi_device_idle_seconds",
                                   "Worker device time idle between steps", registry=r)

    def observe_engine(self, s: EngineStats) -> None:
        self.running.set(s.num_running)
        self.waiting.set(s.num_waiting)
        self.kv_used.set(s.kv_blocks_used)
        self.kv_total.set(s.kv_blocks_total)
        self.kv_usage.set(s.kv_blocks_used / max(1, s.kv_blocks_total))
        self.preemptions.set(s.preemptions_total)
        if s.num_prefill_tokens or s.num_decode_tokens:
            self.iteration.observe(s.iteration_s)
        self.prefill_tokens.inc(s.num_prefill_tokens)
        self.prefix_query.set(s.prefix_cache_query_tokens)
        self.prefix_hit.set(s.prefix_cache_hit_tokens)
        self.device_busy.inc(s.device_busy_s)
        self.device_idle.inc(s.device_idle_s)

    def serve(self, host: str, port: int) -> None:
        start_http_server(port, addr=host, registry=self.registry)

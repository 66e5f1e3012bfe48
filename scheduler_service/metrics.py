"""Prometheus metrics of the scheduler service, served over HTTP at /metrics.

The engine process reports a stats snapshot with every step; the frontend observes latencies as
clients see them (time to first token, time between tokens). One registry per server, so tests
can run several servers in one process.
"""

from __future__ import annotations

from collections import deque

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from scheduler_service.messages import EngineStats, ReplicasChanged

_ERROR_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0)
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                    1.5, 2.0, 3.0, 5.0, 10.0, 30.0)


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
        # reason: stop, length, abort (the engine's), cancelled (by the client), timeout (its
        # deadline), rejected (can never fit the cache), failed (no replica, engine failed).
        self.finished = Counter("sarathi_requests_finished", "Requests ended, by reason", ["reason"],
                                registry=r)
        # idle / (idle + busy) over a window is the share of time the device waited for the host.
        self.device_busy = Counter("sarathi_device_busy_seconds", "Worker device time in steps",
                                   registry=r)
        self.device_idle = Counter("sarathi_device_idle_seconds",
                                   "Worker device time idle between steps", registry=r)
        # The latency model (policies/latency_model.py) against the worker's measured device time:
        # |predicted - measured| / measured per iteration, its P50/P99 over the last iterations,
        # and the safety margin of the --tbt-slo-ms budget.
        self.prediction_error = Histogram(
            "sarathi_latency_prediction_error_ratio", "|predicted - measured| / measured device time "
            "of an iteration", buckets=_ERROR_BUCKETS, registry=r)
        self.prediction_error_q = Gauge(
            "sarathi_latency_prediction_error_quantile", "Quantile of |predicted - measured| / "
            "measured device time over the last 1000 iterations", ["quantile"], registry=r)
        self.slo_margin = Gauge("sarathi_slo_margin_ratio", "Safety margin of the --tbt-slo-ms budget "
                                "(predicted time x (1 + margin) stays within the target)", ["replica"],
                                registry=r)
        self._errors: deque[float] = deque(maxlen=1000)
        self._num_errors = 0
        # Per replica (the scheduler numbers replicas from 1, in the order they joined).
        by = ["replica"]
        self.replica_running = Gauge("sarathi_replica_requests_running", "Requests holding KV blocks",
                                     by, registry=r)
        self.replica_waiting = Gauge("sarathi_replica_requests_waiting", "Requests queued or preempted",
                                     by, registry=r)
        self.replica_kv_used = Gauge("sarathi_replica_kv_blocks_used", "KV-cache blocks in use", by,
                                     registry=r)
        self.replica_kv_total = Gauge("sarathi_replica_kv_blocks_total", "KV-cache blocks in all", by,
                                      registry=r)
        self.replica_busy = Counter("sarathi_replica_device_busy_seconds", "Worker device time in steps",
                                    by, registry=r)
        self.replica_idle = Counter("sarathi_replica_device_idle_seconds",
                                    "Worker device time idle between steps", by, registry=r)
        self.replica_steps = Counter("sarathi_replica_iterations", "Iterations run", by, registry=r)
        # Membership and recovery.
        self.replicas_serving = Gauge("sarathi_replicas_serving", "Replicas taking new requests",
                                      registry=r)
        self.replica_events = Counter("sarathi_replica_events", "Replicas joined, lost or drained",
                                      ["change"], registry=r)
        self.replayed = Counter("sarathi_requests_replayed", "Requests moved from a lost or draining "
                                "replica to continue elsewhere", registry=r)
        self.engine_restarts = Counter("sarathi_engine_restarts", "Engine processes restarted after "
                                       "dying", registry=r)

    def observe_engine(self, s: EngineStats) -> None:
        self.running.set(s.num_running)
        self.waiting.set(s.num_waiting)
        self.kv_used.set(s.kv_blocks_used)
        self.kv_total.set(s.kv_blocks_total)
        self.kv_usage.set(s.kv_blocks_used / max(1, s.kv_blocks_total))
        self.preemptions.set(s.preemptions_total)
        it = s.iteration
        if it.num_prefill_tokens or it.num_decode_tokens:
            self.iteration.observe(it.duration_s)
        self.prefill_tokens.inc(it.num_prefill_tokens)
        self.prefix_query.set(s.prefix_cache_query_tokens)
        self.prefix_hit.set(s.prefix_cache_hit_tokens)
        self.device_busy.inc(it.worker.device_ns / 1e9)
        self.device_idle.inc(it.worker.idle_ns / 1e9)
        replica = str(it.replica)
        if it.predicted_ms > 0 and it.worker.device_ns > 0:
            measured_ms = it.worker.device_ns / 1e6
            error = abs(it.predicted_ms - measured_ms) / measured_ms
            self.prediction_error.observe(error)
            self._errors.append(error)
            self._num_errors += 1
            if self._num_errors % 16 == 1:   # the quantiles every few iterations: cheap enough
                p50, p99 = np.quantile(np.array(self._errors), [0.5, 0.99])
                self.prediction_error_q.labels("0.5").set(p50)
                self.prediction_error_q.labels("0.99").set(p99)
        if it.slo_margin:
            self.slo_margin.labels(replica).set(it.slo_margin)
        self.replica_running.labels(replica).set(s.replica_running)
        self.replica_waiting.labels(replica).set(s.replica_waiting)
        self.replica_kv_used.labels(replica).set(s.replica_kv_blocks_used)
        self.replica_kv_total.labels(replica).set(s.replica_kv_blocks_total)
        self.replica_busy.labels(replica).inc(it.worker.device_ns / 1e9)
        self.replica_idle.labels(replica).inc(it.worker.idle_ns / 1e9)
        self.replica_steps.labels(replica).inc()

    def observe_replicas(self, e: ReplicasChanged) -> None:
        self.replicas_serving.set(e.num_serving)
        self.kv_total.set(e.num_kv_blocks)   # known from the start, not only after a step
        self.replica_events.labels(e.change).inc()
        self.replayed.inc(e.num_replayed)
        if e.change in ("lost", "drained"):
            replica = str(e.replica)
            for gauge in (self.replica_running, self.replica_waiting, self.replica_kv_used,
                          self.replica_kv_total):
                gauge.labels(replica).set(0)

    def serve(self, host: str, port: int) -> None:
        start_http_server(port, addr=host, registry=self.registry)

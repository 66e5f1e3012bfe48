"""The scheduler service's settings, one typed value built once from the command line and
passed down; the scheduling rules that tie settings together (a batch never holds more
sequences than the budget has tokens) live here, not in the CLI."""

from __future__ import annotations

import socket
from dataclasses import dataclass

from sarathi_common.auth import ApiAccessOptions, InternalTLSOptions
from sarathi_common.options import option
from scheduler_service.block_manager import CacheConfig
from scheduler_service.policies import POLICIES, PolicyConfig

_GROUP = "scheduler"
_FAULTS = "replicas and faults"
_SECURITY = "security"
_ROUTER = "router"


@dataclass(frozen=True)
class SchedulerConfig(ApiAccessOptions, InternalTLSOptions):
    host: str = option("127.0.0.1", "address to listen on")
    port: int = option(50051, "gRPC port of the API")
    worker: str | None = option(
        None, "the worker's host:port; several, comma-separated, are replicas of one model (each "
              "dialled again whenever it is lost); with none, workers join (`sarathi worker "
              "--scheduler HOST:PORT`) and health is NOT_SERVING until one has")
    model: str | None = option(None, "the model the worker serves (for the tokenizer)")
    policy: str = option(
        "sarathi", "scheduling policy (default: sarathi; see docs/policies.md): sarathi = chunked "
                   "prefills beside decodes, never stalling them; sarathi_dynamic = sarathi with the "
                   "chunk shrunk to --target-iteration-ms; vllm = prefill-first, whole prompts, decodes "
                   "stall; orca = whole prompts mixed with decodes; faster_transformer = request-level "
                   "batches; simple_chunking = chunked prefills and decodes in alternate iterations",
        choices=list(POLICIES), group=_GROUP)
    chunk_size: int = option(
        512, "token budget per iteration: prompts are prefilled in chunks of at most this (for vllm, "
             "orca, faster_transformer: the most tokens of whole prompts per iteration; a longer prompt "
             "runs as the iteration's only one)", group=_GROUP)
    target_iteration_ms: float = option(
        50.0, "sarathi_dynamic: shrink the prefill chunk so that an iteration's predicted time stays "
              "within this (default: 50)", group=_GROUP)
    min_chunk_size: int = option(32, "sarathi_dynamic: the smallest prefill chunk (default: 32)",
                                 group=_GROUP)
    tbt_slo_ms: float | None = option(
        None, "sarathi: the P99 time-between-tokens target in ms. Each iteration then takes as many "
              "prefill tokens (at most --chunk-size, at least --min-chunk-size) as keep its predicted "
              "device time, plus a safety margin learned from misses, within it; the predictor is "
              "fitted online to the worker's step times, warm-started by a short profile when a "
              "worker joins (default: off, a fixed budget)", group=_GROUP)
    watermark: float = option(0.01, "share of KV blocks that admitting new requests leaves free for "
                                    "running ones (default: 0.01)", group=_GROUP)
    num_host_kv_blocks: int = option(0, "host-memory KV blocks for preemption by swapping (default 0: "
                                        "recompute)", group=_GROUP)
    prefix_caching: bool = option(False, "reuse the KV of full blocks shared with earlier prompts "
                                         "(default: off)", group=_GROUP)
    # 256: the worker's largest decode CUDA graph; vLLM's own default is at least that.
    max_batch_size: int = option(256, "most sequences per iteration (the worker warms its LM head for "
                                      "as many sampled rows at start-up)", group=_GROUP)
    block_size: int = option(16, "tokens per KV-cache block", group=_GROUP)
    num_kv_blocks: int | None = option(None, "cap the KV cache at this many blocks (default: what the "
                                             "worker reports)", group=_GROUP)
    memory_fraction: float = option(0.9, "share of the worker's free memory the KV cache may take",
                                    group=_GROUP)
    tokenizer: str | None = option(None, "tokenizer folder (default: the model's)", group=_GROUP)
    max_message_mb: float = option(
        4.0, "largest request a client may send, in MiB (default: 4; a prompt of a few hundred "
             "thousand tokens needs more)", group=_GROUP)
    max_queue: int = option(4096, "requests in flight before RESOURCE_EXHAUSTED", group=_GROUP)
    overlap: bool = option(True, "wait for each step's result before scheduling the next (default: "
                                 "overlap)", flag="--no-overlap", group=_GROUP)
    metrics_port: int | None = option(None, "serve Prometheus metrics at http://HOST:PORT/metrics "
                                            "(default: off)", group=_GROUP)
    router: str | None = option(
        None, "host:port of a router's join port (`sarathi router --join-port`): announce this scheduler "
              "there, and again every 2 s, so that the router sends it requests", group=_ROUTER)
    advertise: str | None = option(
        None, "host:port where the router reaches this scheduler's API (default: --host:--port, the "
              "host name when listening on every address)", group=_ROUTER)
    local_socket: str | None = option(
        None, "also serve the API on this Unix socket, without TLS, for a client on this host (a "
              "gateway): put it in a folder only this user can open, since file permissions are its "
              "guard; the bearer token is still checked. `serve --http-port` uses one for its gateway "
              "when the API is on TLS", group=_SECURITY)
    internal_port: int | None = option(
        None, "serve Membership (workers join here) on this port instead of the API port, with "
              "mutual TLS when internal TLS is set; with internal TLS and no internal port, workers "
              "cannot join (name them with --worker)", group=_SECURITY)
    internal_peer_name: str | None = option(
        None, "the DNS name every worker's certificate carries, checked instead of the host dialled "
              "(workers are often reached by IP; deploy/dev-certs.sh puts sarathi-worker in theirs; "
              "default: the host dialled)", group=_SECURITY)
    step_timeout_seconds: float = option(
        120.0, "a replica that returns no result for this long is lost (hung or stopped): its "
               "requests move to another replica (default: 120)", group=_FAULTS)
    replica_wait_seconds: float = option(
        30.0, "a request with no replica to run on (none joined yet, or all lost) waits this long "
              "for one, then fails with UNAVAILABLE (default: 30)", group=_FAULTS)
    on_replica_loss: str = option(
        "replay", "replay: a lost replica's requests continue on another replica from the tokens "
                  "already streamed (greedy output as if nothing happened); fail: they end with "
                  "UNAVAILABLE", choices=["replay", "fail"], group=_FAULTS)
    drain_seconds: float = option(
        30.0, "on SIGTERM: stop taking requests (health NOT_SERVING, new calls UNAVAILABLE), let "
              "those in flight finish for up to this long, then exit 0 (default: 30)", group=_FAULTS)

    def worker_addresses(self) -> tuple[str, ...]:
        return tuple(a.strip() for a in (self.worker or "").split(",") if a.strip())

    def advertised_address(self) -> str:
        if self.advertise:
            return self.advertise
        host = socket.gethostname() if self.host in ("0.0.0.0", "::", "[::]", "") else self.host
        return f"{host}:{self.port}"

    def policy_config(self) -> PolicyConfig:
        if self.tbt_slo_ms is not None and self.policy != "sarathi":
            raise ValueError(f"--tbt-slo-ms sizes sarathi's chunks: it does not apply to --policy "
                             f"{self.policy}")
        # A sequence takes at least one token of the budget, so more than chunk_size of them
        # can never run together.
        return PolicyConfig(token_budget=self.chunk_size,
                            max_batch_size=min(self.max_batch_size, self.chunk_size),
                            target_iteration_ms=self.target_iteration_ms,
                            min_chunk_size=self.min_chunk_size, tbt_slo_ms=self.tbt_slo_ms)

    def cache_config(self) -> CacheConfig:
        return CacheConfig(watermark=self.watermark, prefix_caching=self.prefix_caching,
                           num_host_blocks=self.num_host_kv_blocks)

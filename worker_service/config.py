"""The worker's settings, one typed value built once from the command line (no torch here: the
CLI and `serve`'s supervisor build it without loading the worker)."""

from __future__ import annotations

import socket
from dataclasses import dataclass

from sarathi_common.auth import InternalTLSOptions
from sarathi_common.options import option

# The default: a scheduler's usual largest budget. On an H200 graphs halve small iterations
# (64-token chunk + 16 decodes: 10.3 ms against 28.1 eager) and tie from ~512 tokens on.
HYBRID_GRAPH_TOKENS = 2048

_LAYOUT = "replica layout (tensor and pipeline parallelism)"
_MEMBERSHIP = "membership and shutdown"
_SECURITY = "security"
JOIN_INTERVAL_S = 2.0


@dataclass(frozen=True)
class WorkerConfig(InternalTLSOptions):
    host: str = option("127.0.0.1", "address to listen on")
    port: int = option(50061, "gRPC port")
    model: str | None = option(
        None, "a .gguf file, a Hugging Face folder, or dummy:NAME (llama3-8b, mistral-7b, qwen2.5-7b, "
              "llama3-70b, smollm2-135m, tiny); default: the embedded SmolLM2-135M-Instruct", group="worker")
    device: str | None = option(None, "cpu or cuda[:N]; default: cuda if present, else cpu", group="worker")
    dtype: str | None = option(None, "weights and KV cache; default: float32 on cpu, bfloat16 on cuda",
                               choices=["float32", "bfloat16", "float16"], group="worker")
    attention: str = option("auto", "attention backend; auto: torch on cpu, flashinfer (else triton) on cuda",
                            choices=["auto", "torch", "flashinfer", "triton"], group="worker")
    threads: int | None = option(None, "torch CPU threads (default: torch's choice)", group="worker")
    cpu_cache_gib: float = option(2.0, "on the CPU, the most memory the KV cache may take (GiB)",
                                  group="worker")
    weights_seed: int = option(0, "seed of dummy weights", group="worker")
    cuda_graphs: bool = option(True, "run decode iterations eagerly (default: CUDA graphs on GPUs)",
                               flag="--no-cuda-graphs", group="worker")
    hybrid_graph_tokens: int | None = option(
        None, "on GPUs, also run iterations with prefill chunks of up to this many tokens as piecewise "
              f"CUDA graphs, cut at attention (default {HYBRID_GRAPH_TOKENS}; under `serve` at most "
              "--chunk-size; 0: off)", group="worker")
    tensor_parallel_size: int = option(1, "ranks sharing each stage's layers", group=_LAYOUT)
    pipeline_parallel_size: int = option(1, "stages, each a slice of the layers", group=_LAYOUT)
    rank: int = option(0, "this worker's rank in the replica (stage * TP size + TP rank); rank 0 serves "
                          "gRPC", group=_LAYOUT)
    replica_addresses: str | None = option(
        None, "host:port of every rank's ZeroMQ mailbox, comma-separated, in rank order", group=_LAYOUT)
    dist_init: str | None = option(None, "host:port of torch.distributed's store (rank 0's host)",
                                   group=_LAYOUT)
    scheduler: str | None = option(
        None, "host:port of a scheduler to join: the worker announces itself there, and again every "
              f"{JOIN_INTERVAL_S:g} s (so a restarted scheduler finds it again)", group=_MEMBERSHIP)
    advertise: str | None = option(
        None, "host:port where the scheduler reaches this worker (default: --host:--port, the host "
              "name when listening on every address)", group=_MEMBERSHIP)
    drain_seconds: float = option(
        30.0, "on SIGTERM: tell the scheduler (it moves or finishes this worker's requests and takes "
              "no new ones here), wait for it to let go for up to this long, then exit 0", group=_MEMBERSHIP)
    internal_peer_name: str | None = option(
        None, "the DNS name the scheduler's certificate carries, checked instead of --scheduler's "
              "host (default: that host)", group=_SECURITY)
    replica_curve: bool = option(
        False, "authenticate and encrypt the ZeroMQ links between a replica's ranks with CURVE "
               "(a replica started whole on this host makes a fresh key; across hosts give "
               "--replica-key-file)", group=_SECURITY)
    replica_key_file: str | None = option(
        None, "CURVE on the ranks' ZeroMQ links with the key pair in this file (the same file on "
              "every rank; `python -m worker_service.parallel.curve FILE` makes one); implies "
              "--replica-curve", group=_SECURITY)
    replica_bind: str | None = option(
        None, "the address each rank's ZeroMQ mailbox binds, e.g. the replica's private network "
              "(default: every interface; a replica started whole on this host binds loopback)",
        group=_SECURITY)

    # What a rank that this worker starts inherits: the model and how to run it, not where to listen.
    SHARED = ("model", "device", "dtype", "attention", "threads", "cpu_cache_gib", "weights_seed",
              "cuda_graphs", "hybrid_graph_tokens", "tensor_parallel_size", "pipeline_parallel_size")

    # What `serve` passes to the worker it starts besides SHARED (file paths only: no key material
    # on a command line).
    SECURITY = ("internal_ca_file", "internal_cert_file", "internal_key_file", "replica_curve",
                "replica_key_file", "replica_bind")

    def advertised_address(self) -> str:
        if self.advertise:
            return self.advertise
        host = socket.gethostname() if self.host in ("0.0.0.0", "::", "[::]", "") else self.host
        return f"{host}:{self.port}"

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def cpu_cache_bytes(self) -> int:
        return int(self.cpu_cache_gib * (1 << 30))

    def graph_tokens(self, graphs: bool) -> int:
        """Tokens up to which hybrid iterations run as CUDA graphs (0: none)."""
        if not graphs:
            return 0
        return HYBRID_GRAPH_TOKENS if self.hybrid_graph_tokens is None else self.hybrid_graph_tokens

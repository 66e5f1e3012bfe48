"""The scheduler's connection to one worker (or one replica's rank 0): Describe, InitCache, and
the long-lived Step stream, whose results a reader thread hands to the engine loop."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from protos import worker_pb2, worker_pb2_grpc
from protos.batch_plan import BatchPlan, StepOutput
from sarathi_common.auth import InternalTLS

GRPC_OPTIONS = [("grpc.max_send_message_length", 256 << 20),
                ("grpc.max_receive_message_length", 256 << 20),
                # A worker whose host vanished (no FIN, no RST) is found by keepalive pings
                # rather than by a TCP timeout of many minutes.
                ("grpc.keepalive_time_ms", 10_000),
                ("grpc.keepalive_timeout_ms", 5_000),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.max_pings_without_data", 0)]


class WorkerUnavailable(RuntimeError):
    """The worker is gone or broke the stream; in-flight requests cannot complete there."""


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker said about itself, and the cache the scheduler gave it."""

    model: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int]
    dtype: str
    device: str
    num_blocks: int
    pipeline_parallel_size: int


class WorkerLink:
    def __init__(self, address: str, tls: InternalTLS | None = None, peer_name: str | None = None) -> None:
        """`tls`: dial over mutual TLS, checking the worker's certificate for `peer_name` (or,
        when None, for the address's host)."""
        self.address = address
        self._channel = (grpc.secure_channel(address, tls.channel_credentials(),
                                             options=GRPC_OPTIONS + tls.channel_options(peer_name))
                         if tls else grpc.insecure_channel(address, options=GRPC_OPTIONS))
        self._stub = worker_pb2_grpc.WorkerStub(self._channel)
        self._plans: queue.SimpleQueue[worker_pb2.BatchPlan | None] | None = None
        self._call = None   # the Step stream (an iterator of results that can be cancelled)

    def connect(self, timeout: float, block_size: int, memory_fraction: float, token_budget: int,
                num_kv_blocks: int | None, num_host_blocks: int, max_num_seqs: int = 0) -> WorkerInfo:
        """Waits for the worker, sizes and allocates its KV cache, opens the Step stream."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise WorkerUnavailable(f"no worker answered at {self.address} within {timeout:.0f} s") from None
        info = self._unary(self._stub.Describe, worker_pb2.DescribeRequest(
            block_size=block_size, memory_fraction=memory_fraction, max_num_batched_tokens=token_budget,
            max_num_seqs=max_num_seqs))
        num_blocks = info.num_blocks_available
        if num_kv_blocks is not None:
            num_blocks = min(num_blocks, num_kv_blocks) if num_blocks else num_kv_blocks
        if num_blocks < 1:
            raise RuntimeError(f"the worker at {self.address} has no memory left for a KV cache: lower "
                               "the model size or raise --memory-fraction")
        self._unary(self._stub.InitCache, worker_pb2.InitCacheRequest(
            num_blocks=num_blocks, block_size=block_size, num_host_blocks=num_host_blocks))
        plans: queue.SimpleQueue[worker_pb2.BatchPlan | None] = queue.SimpleQueue()
        self._plans = plans
        self._call = self._stub.Step(iter(plans.get, None))
        return WorkerInfo(model=info.model, max_model_len=info.max_model_len, vocab_size=info.vocab_size,
                          eos_token_ids=list(info.eos_token_ids), dtype=info.dtype, device=info.device,
                          num_blocks=num_blocks, pipeline_parallel_size=max(1, info.pipeline_parallel_size))

    def send(self, plan: BatchPlan) -> None:
        """Queues a plan; results come back in order through read_results."""
        assert self._plans is not None, "connect first"
        self._plans.put(plan.to_proto())

    def run_now(self, plan: BatchPlan) -> StepOutput:
        """Sends a plan and waits for its result, on the caller's thread: only before
        read_results starts (the start-up profile)."""
        assert self._call is not None, "connect first"
        self.send(plan)
        try:
            return StepOutput.from_proto(next(self._call))
        except StopIteration:
            raise WorkerUnavailable(f"worker {self.address} closed the step stream") from None
        except grpc.RpcError as e:
            raise WorkerUnavailable(f"worker {self.address}: {e.code().name}: {e.details()}") from e

    def read_results(self, deliver: Callable[[StepOutput | WorkerUnavailable], None]) -> threading.Thread:
        """Starts a thread that hands each result to `deliver`, then one WorkerUnavailable when
        the stream ends for any reason."""
        assert self._call is not None, "connect first"
        call = self._call

        def read() -> None:
            try:
                for msg in call:
                    deliver(StepOutput.from_proto(msg))
                deliver(WorkerUnavailable(f"worker {self.address} closed the step stream"))
            except grpc.RpcError as e:
                deliver(WorkerUnavailable(f"worker {self.address}: {e.code().name}: {e.details()}"))

        thread = threading.Thread(target=read, daemon=True, name=f"results-{self.address}")
        thread.start()
        return thread

    def close(self) -> None:
        """Ends the stream (the worker forgets this scheduler's sequences) and the channel."""
        if self._plans is not None:
            self._plans.put(None)
        if self._call is not None:
            self._call.cancel()
        self._channel.close()

    def _unary(self, method, request):
        try:
            return method(request, timeout=600)
        except grpc.RpcError as e:
            raise WorkerUnavailable(f"worker {self.address}: {e.code().name}: {e.details()}") from e

"""The scheduler's connection to a worker: Describe, InitCache, and the long-lived Step stream."""

from __future__ import annotations

import queue
from collections.abc import Iterator

import grpc

from protos import worker_pb2, worker_pb2_grpc
from protos.batch_plan import BatchPlan, StepOutput

GRPC_OPTIONS = [("grpc.max_send_message_length", 256 << 20),
                ("grpc.max_receive_message_length", 256 << 20)]


class WorkerUnavailable(RuntimeError):
    """The worker is gone or broke the stream; in-flight requests cannot complete."""


class WorkerLink:
    def __init__(self, address: str) -> None:
        self.address = address
        self._channel = grpc.insecure_channel(address, options=GRPC_OPTIONS)
        self._stub = worker_pb2_grpc.WorkerStub(self._channel)
        self._plans: queue.SimpleQueue[worker_pb2.BatchPlan | None] | None = None
        self._results: Iterator[worker_pb2.StepResult] | None = None

    def wait_ready(self, timeout: float) -> None:
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise WorkerUnavailable(f"no worker answered at {self.address} within {timeout:.0f} s") from None

    def describe(self, block_size: int, memory_fraction: float,
                 max_num_batched_tokens: int) -> worker_pb2.DescribeResponse:
        return self._call(self._stub.Describe, worker_pb2.DescribeRequest(
            block_size=block_size, memory_fraction=memory_fraction,
            max_num_batched_tokens=max_num_batched_tokens))

    def init_cache(self, num_blocks: int, block_size: int, num_host_blocks: int = 0) -> int:
        resp = self._call(self._stub.InitCache, worker_pb2.InitCacheRequest(
            num_blocks=num_blocks, block_size=block_size, num_host_blocks=num_host_blocks))
        self._open_stream()
        return resp.cache_bytes

    def send(self, plan: BatchPlan) -> None:
        """Queues a plan; results come back in order from receive()."""
        assert self._plans is not None, "init_cache first"
        self._plans.put(plan.to_proto())

    def receive(self) -> StepOutput:
        assert self._results is not None
        try:
            return StepOutput.from_proto(next(self._results))
        except grpc.RpcError as e:
            raise WorkerUnavailable(f"worker {self.address}: {e.code().name}: {e.details()}") from e
        except StopIteration:
            raise WorkerUnavailable(f"worker {self.address} closed the step stream") from None

    def close(self) -> None:
        if self._plans is not None:
            self._plans.put(None)
        self._channel.close()

    def _open_stream(self) -> None:
        plans: queue.SimpleQueue[worker_pb2.BatchPlan | None] = queue.SimpleQueue()
        self._plans = plans
        self._results = self._stub.Step(iter(plans.get, None))

    def _call(self, method, request):
        try:
            return method(request, timeout=600)
        except grpc.RpcError as e:
            raise WorkerUnavailable(f"worker {self.address}: {e.code().name}: {e.details()}") from e

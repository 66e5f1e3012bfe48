"""The worker's gRPC service: Describe, InitCache and the Step stream around a ModelRunner."""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc

from protos import worker_pb2, worker_pb2_grpc
from protos.batch_plan import BatchPlan
from worker_service import memory
from worker_service.runner import ModelRunner, PlanError

GRPC_OPTIONS = [("grpc.max_send_message_length", 256 << 20),
                ("grpc.max_receive_message_length", 256 << 20)]


class WorkerService(worker_pb2_grpc.WorkerServicer):
    def __init__(self, runner: ModelRunner, weight_bytes: int, cpu_cache_limit: int) -> None:
        self.runner = runner
        self.weight_bytes = weight_bytes
        self.cpu_cache_limit = cpu_cache_limit
        self._stream_lock = threading.Lock()

    def Describe(self, request, context):
        block_size = request.block_size or 16
        fraction = request.memory_fraction or 0.9
        c = self.runner.config
        free = memory.free_memory_bytes(self.runner.device)
        if self.runner.device.type == "cuda" and hasattr(self.runner, "profile_free_memory"):
            # Run a worst-case iteration first: activations and CUDA graphs need room too.
            budget = self.runner.profile_free_memory(request.max_num_batched_tokens or 8192, fraction)
        else:
            budget = min(memory.host_kv_budget(fraction), self.cpu_cache_limit)
        per_block = self.runner.bytes_per_block(block_size)
        return worker_pb2.DescribeResponse(
            model=c.name, device=str(self.runner.device), dtype=str(self.runner.dtype).removeprefix("torch."),
            num_layers=c.num_layers, vocab_size=c.vocab_size, max_model_len=c.max_model_len,
            eos_token_ids=list(c.eos_token_ids), weight_bytes=self.weight_bytes,
            free_memory_bytes=free, bytes_per_block=per_block,
            num_blocks_available=budget // per_block,
            # A parallel replica's driver runs up to `depth` micro-batches; one runner runs one.
            pipeline_parallel_size=getattr(self.runner, "depth", 1))

    def InitCache(self, request, context):
        if request.num_blocks < 1 or request.block_size < 1:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "num_blocks and block_size must be >= 1")
        with self._stream_lock:
            cache_bytes = self.runner.init_cache(request.num_blocks, request.block_size,
                                                 request.num_host_blocks)
        return worker_pb2.InitCacheResponse(cache_bytes=cache_bytes)

    def Step(self, request_iterator: Iterator[worker_pb2.BatchPlan],
             context) -> Iterator[worker_pb2.StepResult]:
        if not self._stream_lock.acquire(blocking=False):
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "another scheduler holds the step stream")
        feeder: threading.Thread | None = None
        try:
            # A new stream means a new scheduler: forget sequences from the previous one.
            self.runner.reset()
            # A feeder thread launches plans as they arrive, so the host prepares step i+1
            # while the device runs step i; this generator waits for each step's tokens in order.
            launched: queue.SimpleQueue = queue.SimpleQueue()
            feeder = threading.Thread(target=self._feed, args=(request_iterator, launched),
                                      daemon=True, name="worker-launch")
            feeder.start()
            while (item := launched.get()) is not None:
                if isinstance(item, PlanError):
                    context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(item))
                if isinstance(item, BaseException):
                    raise item
                yield self.runner.finish(item).to_proto()
        finally:
            # The next scheduler's stream must not meet this one's launches on the runner: the
            # request iterator ends (or raises) once this RPC is over, and with it the feeder.
            if feeder is not None:
                feeder.join(timeout=30)
            self._stream_lock.release()

    def _feed(self, request_iterator: Iterator[worker_pb2.BatchPlan], launched: queue.SimpleQueue) -> None:
        try:
            for msg in request_iterator:
                launched.put(self.runner.launch(BatchPlan.from_proto(msg)))
        except PlanError as e:
            launched.put(e)
        except grpc.RpcError:
            pass   # the scheduler went away: the stream ends
        except Exception as e:  # noqa: BLE001 - surface it to the stream rather than lose it
            launched.put(e)
        launched.put(None)


def serve_worker(runner: ModelRunner, host: str, port: int, weight_bytes: int,
                 cpu_cache_limit: int) -> grpc.Server:
    # The launch thread holds the GIL for the whole of an eager step's kernel launches (tens of
    # ms for a hybrid step); at Python's default 5 ms switch interval the thread that returns the
    # previous step's tokens waits that long, and so does the scheduler's next plan.
    sys.setswitchinterval(5e-4)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=GRPC_OPTIONS)
    worker_pb2_grpc.add_WorkerServicer_to_server(WorkerService(runner, weight_bytes, cpu_cache_limit), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}: is the port in use?")
    server.start()
    return server

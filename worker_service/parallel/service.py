"""Rank 0's gRPC Worker service: the scheduler's single entry into a replica.

Describe and InitCache are the single-worker service's own (the driver answers for the whole
replica). Step is registered with an identity deserializer, so each plan's bytes go on to the
other ranks exactly as they arrived and every rank decodes them once.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import torch

from protos import worker_pb2
from worker_service import memory
from worker_service.config import WorkerConfig
from worker_service.parallel.layout import ReplicaLayout
from worker_service.parallel.replica import ReplicaDriver, build_rank, exit_now, follow
from worker_service.runner import PlanError
from worker_service.server import GRPC_OPTIONS, WorkerService

log = logging.getLogger("sarathi.replica")


class ReplicaWorkerService(WorkerService):
    def __init__(self, driver: ReplicaDriver, weight_bytes: int, cpu_cache_limit: int) -> None:
        super().__init__(driver, weight_bytes, cpu_cache_limit)   # type: ignore[arg-type]
        self.driver = driver

    def Step(self, request_iterator: Iterator[bytes], context) -> Iterator[bytes]:
        if not self._stream_lock.acquire(blocking=False):
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "another scheduler holds the step stream")
        try:
            self.driver.reset()
            # A feeder thread dispatches plans as they arrive (the scheduler may send the next
            # before it reads a result); this generator collects results in order. With PP
            # stages, plan N+1 then enters stage 0 while stage 1 still runs plan N.
            dispatched: queue.SimpleQueue[int | BaseException | None] = queue.SimpleQueue()
            threading.Thread(target=self._feed, args=(request_iterator, dispatched), daemon=True,
                             name="replica-dispatch").start()
            while (item := dispatched.get()) is not None:
                if isinstance(item, int):
                    try:
                        item = self.driver.collect(item)
                    except BaseException as e:  # noqa: BLE001 - reported below
                        item = e
                if isinstance(item, PlanError):
                    context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(item))
                if isinstance(item, BaseException):
                    # A collective or handoff broke: the ranks are out of step, nothing this
                    # replica computes can be trusted. Tell the scheduler, then end the process
                    # (the other ranks follow when its heartbeats stop).
                    log.error("replica step failed: %r", item)
                    threading.Timer(0.5, exit_now, args=(4,)).start()
                    context.abort(grpc.StatusCode.UNAVAILABLE, f"replica failed: {item!r}")
                yield item
        finally:
            self._stream_lock.release()

    def _feed(self, request_iterator: Iterator[bytes], dispatched: queue.SimpleQueue) -> None:
        plans = iter(request_iterator)
        while True:
            try:
                plan_bytes = next(plans)
            except (StopIteration, grpc.RpcError):   # the scheduler closed or cancelled the stream
                break
            try:
                dispatched.put(self.driver.dispatch(plan_bytes))
            except BaseException as e:  # noqa: BLE001 - handed to the stream's thread
                dispatched.put(e)
                return
        dispatched.put(None)


def _handlers(svc: ReplicaWorkerService) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler("sarathi.v1.Worker", {
        "Describe": grpc.unary_unary_rpc_method_handler(
            svc.Describe, request_deserializer=worker_pb2.DescribeRequest.FromString,
            response_serializer=worker_pb2.DescribeResponse.SerializeToString),
        "InitCache": grpc.unary_unary_rpc_method_handler(
            svc.InitCache, request_deserializer=worker_pb2.InitCacheRequest.FromString,
            response_serializer=worker_pb2.InitCacheResponse.SerializeToString),
        "Step": grpc.stream_stream_rpc_method_handler(
            svc.Step, request_deserializer=bytes, response_serializer=bytes),
    })


def layout_of(config: WorkerConfig) -> ReplicaLayout:
    tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
    if config.replica_addresses is None or config.dist_init is None:
        raise SystemExit(f"a replica of TP={tp} x PP={pp} spread over hosts needs --replica-addresses "
                         "(one host:port per rank) and --dist-init host:port on every rank; "
                         "rank 0 given neither runs the whole replica on this host")
    return ReplicaLayout.parse(tp, pp, config.replica_addresses, config.dist_init)


def run_replica_worker(config: WorkerConfig, load, device: torch.device, dtype: torch.dtype) -> None:
    """`sarathi worker` with --tensor-parallel-size or --pipeline-parallel-size above 1."""
    layout = layout_of(config)
    rank = config.rank
    start = time.monotonic()
    r = build_rank(layout, rank, load, device, dtype, cuda_graphs=config.cuda_graphs)
    weight_bytes = memory.weight_bytes(r.runner.model)
    where = f"rank {rank} (stage {layout.stage_of(rank)}, TP rank {layout.tp_rank_of(rank)}) " \
            f"of TP={layout.tp_size} x PP={layout.pp_size}"
    print(f"worker {where}: {weight_bytes / 1e6:.0f} MB of weights in this shard, built in "
          f"{time.monotonic() - start:.1f} s", flush=True)
    if rank != 0:
        signal.signal(signal.SIGTERM, lambda *_: exit_now(0))
        r.mailbox.wait_for_peers(timeout=900)
        try:
            follow(r)
        except BaseException:  # noqa: BLE001 - a broken collective or handoff: the replica is done
            log.exception("rank %d failed", rank)
            exit_now(5)        # not a normal exit: gloo's teardown could wait on dead peers
        exit_now(0)
    r.mailbox.wait_for_peers(timeout=900)
    driver = ReplicaDriver(r)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=GRPC_OPTIONS)
    # Weights of the whole replica: ranks of one stage hold equal shards, stages about equal.
    server.add_generic_rpc_handlers((_handlers(ReplicaWorkerService(
        driver, weight_bytes * layout.world_size, config.cpu_cache_bytes)),))
    if server.add_insecure_port(f"{config.host}:{config.port}") == 0:
        raise OSError(f"cannot listen on {config.host}:{config.port}: is the port in use?")
    server.start()
    print(f"worker {where}: listening on {config.host}:{config.port}", flush=True)

    def on_term(*_):
        driver.stop()
        server.stop(0)

    signal.signal(signal.SIGTERM, on_term)
    server.wait_for_termination()
    exit_now(0)

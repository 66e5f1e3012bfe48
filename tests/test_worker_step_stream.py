"""The Worker service's Step stream and its one error policy, around a fake executor (no model):
results in plan order, a plan error ends the stream FAILED_PRECONDITION and the worker serves
the next one, a second scheduler is turned away, a broken executor ends the stream UNAVAILABLE
and the process."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator

import grpc
import pytest
import torch
from conftest import serve_executor

import worker_service.server as server_module
from protos import worker_pb2, worker_pb2_grpc
from protos.batch_plan import BatchPlan, StepOutput
from worker_service.executor import ExecutorBroken, PlanError
from worker_service.models.config import ModelConfig

BAD_PLAN, BROKEN, BAD_RESULT = 666, 777, 888   # step ids the fake executor fails on


class FakeExecutor:
    config = ModelConfig("fake", 10, 8, 16, 2, 2, 1, 4, 1e-5, 64, False, False, (0,))
    device, dtype, depth = torch.device("cpu"), torch.float32, 1

    def __init__(self) -> None:
        self.resets = 0

    def bytes_per_block(self, block_size: int) -> int:
        return block_size

    def profile_free_memory(self, max_num_tokens: int, fraction: float = 0.9, max_num_seqs: int = 0) -> int:
        return 0

    def init_cache(self, num_blocks: int, block_size: int, num_host_blocks: int = 0) -> int:
        return num_blocks * block_size

    def reset(self) -> None:
        self.resets += 1

    def dispatch(self, plan: bytes) -> int:
        step_id = worker_pb2.BatchPlan.FromString(plan).step_id
        if step_id == BAD_PLAN:
            raise PlanError(f"step {step_id}: unknown sequence")
        if step_id == BROKEN:
            raise ExecutorBroken("replica failed: RuntimeError('peer gone')")
        return step_id

    def collect(self, step_id: int) -> bytes:
        if step_id == BAD_RESULT:
            raise PlanError(f"step {step_id}: reported by a later stage")
        return StepOutput(step_id, [1], [step_id]).to_proto().SerializeToString()

    def stop(self) -> None:
        pass


@pytest.fixture
def worker(monkeypatch) -> Iterator[tuple[worker_pb2_grpc.WorkerStub, FakeExecutor, list[int]]]:
    exits: list[int] = []
    monkeypatch.setattr(server_module, "exit_now", exits.append)   # the test process stays
    executor = FakeExecutor()
    server, port = serve_executor(executor, max_workers=4)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = worker_pb2_grpc.WorkerStub(channel)
    stub.port = port
    yield stub, executor, exits
    channel.close()
    server.stop(0)


def open_stream(stub: worker_pb2_grpc.WorkerStub) -> tuple[queue.SimpleQueue, Iterator]:
    plans: queue.SimpleQueue = queue.SimpleQueue()
    return plans, stub.Step(iter(plans.get, None))


def plan(step_id: int) -> worker_pb2.BatchPlan:
    return BatchPlan(step_id).to_proto()


def stream_error(stub: worker_pb2_grpc.WorkerStub, step_id: int) -> grpc.RpcError:
    """The error ending a stream whose first plan is step_id; the scheduler's side of the stream
    stays open until then."""
    plans, results = open_stream(stub)
    plans.put(plan(step_id))
    with pytest.raises(grpc.RpcError) as err:
        next(results)
    plans.put(None)
    return err.value


def test_results_come_back_in_plan_order_and_a_plan_error_ends_only_its_stream(worker):
    stub, executor, exits = worker
    plans, results = open_stream(stub)
    for step_id in (1, 2, BAD_PLAN, 4):
        plans.put(plan(step_id))
    assert [next(results).step_id for _ in range(2)] == [1, 2]
    with pytest.raises(grpc.RpcError) as err:
        next(results)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "unknown sequence" in err.value.details()
    plans.put(None)
    # The worker serves the next scheduler, from a clean state.
    plans, results = open_stream(stub)
    plans.put(plan(5))
    assert next(results).step_id == 5
    plans.put(None)
    assert list(results) == []
    assert executor.resets == 2 and exits == []


def test_a_second_scheduler_is_turned_away_while_the_first_holds_the_stream(worker):
    stub, _, _ = worker
    plans, results = open_stream(stub)
    plans.put(plan(1))
    assert next(results).step_id == 1
    # Another scheduler: its own connection (the same one would be the attached scheduler
    # itself, reconnecting, and would replace its stream).
    port = stub.port
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
        other_plans, other = open_stream(worker_pb2_grpc.WorkerStub(ch))
        with pytest.raises(grpc.RpcError) as err:
            next(other)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "serves another scheduler" in err.value.details()
        other_plans.put(None)
    plans.put(plan(2))
    assert next(results).step_id == 2
    plans.put(None)


def test_an_error_collecting_a_step_is_reported_at_once_while_the_scheduler_still_streams(worker):
    # The feeder then still waits for the next plan: waiting for it must not hold back the status.
    stub, _, _ = worker
    start = time.monotonic()
    assert stream_error(stub, BAD_RESULT).code() == grpc.StatusCode.FAILED_PRECONDITION
    assert time.monotonic() - start < 5
    plans, results = open_stream(stub)   # the stream is free again once the old RPC is over
    plans.put(plan(1))
    assert next(results).step_id == 1
    plans.put(None)


def test_a_broken_executor_ends_the_stream_unavailable_and_then_the_process(worker):
    stub, _, exits = worker
    err = stream_error(stub, BROKEN)
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert err.details() == "replica failed: RuntimeError('peer gone')"
    deadline = time.monotonic() + 5
    while not exits and time.monotonic() < deadline:
        time.sleep(0.05)
    assert exits == [server_module.BROKEN_EXIT_CODE]

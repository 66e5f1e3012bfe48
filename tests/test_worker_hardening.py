"""A real worker process against raw stubs (issue 21): every plan field it indexes with is
bounds-checked (FAILED_PRECONDITION naming the field) and the worker serves the next stream;
InitCache refuses a size the device cannot hold and keeps the cache it had."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import grpc
import pytest
import torch
from conftest import ROOT, serve_executor
from test_worker_step_stream import FakeExecutor

from protos import worker_pb2 as wpb
from protos import worker_pb2_grpc
from sarathi_common.lifecycle import popen_tied
from sarathi_common.net import free_port

NUM_BLOCKS, BLOCK_SIZE = 64, 16


@pytest.fixture(scope="module")
def worker() -> Iterator[tuple[worker_pb2_grpc.WorkerStub, wpb.DescribeResponse]]:
    port = free_port()
    proc = popen_tied([sys.executable, "-m", "sarathi.cli", "worker", "--port", str(port),
                       "--model", "dummy:tiny", "--threads", "1"], cwd=ROOT, start_new_session=True)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = worker_pb2_grpc.WorkerStub(channel)
    deadline = time.monotonic() + 120
    while True:
        try:
            info = stub.Describe(wpb.DescribeRequest(block_size=BLOCK_SIZE), timeout=5)
            break
        except grpc.RpcError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise
            time.sleep(0.2)
    stub.InitCache(wpb.InitCacheRequest(num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE), timeout=30)
    stub.port = port
    yield stub, info
    channel.close()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def plan(**fields) -> wpb.BatchPlan:
    """Step 1: one new 3-token sequence in block 0, prefilled whole; `fields` override."""
    base = dict(step_id=1, new_sequences=[wpb.NewSequence(
        seq_id=7, token_ids=[1, 2, 3], block_table=[0], num_prompt_tokens=3,
        sampling=wpb.SamplingOptions(temperature=0.0, top_p=1.0))],
        seq_ids=[7], num_computed_tokens=[0], num_scheduled_tokens=[3], new_block_counts=[0])
    base.update(fields)
    return wpb.BatchPlan(**base)


def new_seq(**fields) -> list[wpb.NewSequence]:
    seq = plan().new_sequences[0]
    for name, value in fields.items():
        if name == "sampling":
            seq.sampling.CopyFrom(value)
        else:
            field = getattr(seq, name)
            del field[:]
            field.extend(value)
    return [seq]


def step(stub, *plans: wpb.BatchPlan) -> list[wpb.StepResult]:
    return list(stub.Step(iter(plans), timeout=30))


def test_a_good_plan_runs(worker):
    stub, _ = worker
    (result,) = step(stub, plan())
    assert list(result.seq_ids) == [7] and len(result.token_ids) == 1


BAD_PLANS = {
    "new block id outside the cache": (dict(new_block_counts=[1], new_block_ids=[10**6]), "new_block_ids"),
    "block table outside the cache": (dict(new_sequences=new_seq(block_table=[NUM_BLOCKS])), "block_table"),
    "block counts disagree": (dict(new_block_counts=[2], new_block_ids=[1]), "new_block_counts"),
    "columns of different lengths": (dict(num_scheduled_tokens=[3, 1]), "num_scheduled_tokens"),
    "a sequence twice": (dict(seq_ids=[7, 7], num_computed_tokens=[0, 0], num_scheduled_tokens=[3, 3],
                              new_block_counts=[0, 0]), "seq_ids"),
    "token outside the vocabulary": (dict(new_sequences=new_seq(token_ids=[1, 2, 1 << 31])), "token_ids"),
    "temperature nan": (dict(new_sequences=new_seq(sampling=wpb.SamplingOptions(temperature=float("nan")))),
                        "sampling"),
    "more tokens than the context": (dict(new_sequences=new_seq(token_ids=[1] * 100_000)), "token_ids"),
}


def test_every_bad_plan_field_gets_failed_precondition_and_the_worker_serves_on(worker):
    stub, _ = worker
    wrong = {}
    for case, (fields, words) in BAD_PLANS.items():
        try:
            step(stub, plan(**fields))
            wrong[case] = "OK"
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.FAILED_PRECONDITION or words not in e.details():
                wrong[case] = f"{e.code().name}: {e.details()}"
        # The next stream (a scheduler's reconnect) is served.
        (result,) = step(stub, plan())
        assert list(result.seq_ids) == [7], case
    assert not wrong, wrong


def test_init_cache_refuses_what_cannot_fit_and_keeps_its_cache(worker):
    stub, info = worker
    for num_blocks, host in (((1 << 32) - 1, 0), (1, (1 << 32) - 1)):
        with pytest.raises(grpc.RpcError) as err:
            stub.InitCache(wpb.InitCacheRequest(num_blocks=num_blocks, block_size=BLOCK_SIZE,
                                                num_host_blocks=host), timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
        assert "Describe" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.InitCache(wpb.InitCacheRequest(num_blocks=1, block_size=(1 << 32) - 1), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # The cache of NUM_BLOCKS is still there: a plan using its last block runs.
    (result,) = step(stub, plan(new_sequences=new_seq(block_table=[NUM_BLOCKS - 1])))
    assert list(result.seq_ids) == [7]


def test_a_second_worker_on_a_busy_port_exits_with_one_line(worker):
    stub, _ = worker
    proc = subprocess.run([sys.executable, "-m", "sarathi.cli", "worker", "--port", str(stub.port),
                           "--model", "dummy:tiny", "--threads", "1"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert any("in use" in line for line in proc.stderr.splitlines()), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_a_failed_allocation_puts_the_previous_cache_back():
    """The memory check can pass and the allocation still fail (fragmentation, another
    process): the worker allocates its previous cache again. An executor that fails large
    allocations, in the service itself."""
    class FailsLarge(FakeExecutor):
        calls: list[int] = []

        def init_cache(self, num_blocks: int, block_size: int, num_host_blocks: int = 0) -> int:
            self.calls.append(num_blocks)
            if num_blocks > 100:
                raise torch.OutOfMemoryError("CUDA out of memory")
            return num_blocks * block_size

    executor = FailsLarge()
    server, port = serve_executor(executor, max_workers=2)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            stub.InitCache(wpb.InitCacheRequest(num_blocks=50, block_size=16), timeout=10)
            with pytest.raises(grpc.RpcError) as err:
                stub.InitCache(wpb.InitCacheRequest(num_blocks=1000, block_size=16), timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "previous cache stays" in err.value.details()
        assert executor.calls == [50, 1000, 50]
    finally:
        server.stop(0)

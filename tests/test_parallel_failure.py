"""A replica's workers as separate processes (each could be on another host): losing any one
of them fails the replica fast and loudly, and leaves no process behind."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import grpc
import pytest
from conftest import ROOT, collect, greedy_request
from grpc_health.v1 import health_pb2
from test_services import health_status, kill, spawn

from protos import generation_pb2_grpc
from sarathi.client import wait_serving
from sarathi_common.net import free_port

TINY = ("--model", "dummy:tiny", "--threads", "1")


def start_replica(tp: int, pp: int) -> tuple[str, list, dict]:
    """Every rank as its own `sarathi worker`, plus a scheduler pointed at rank 0."""
    world = tp * pp
    grpc_port, sched_port = free_port(), free_port()
    layout = ["--tensor-parallel-size", str(tp), "--pipeline-parallel-size", str(pp),
              "--replica-addresses", ",".join(f"127.0.0.1:{free_port()}" for _ in range(world)),
              "--dist-init", f"127.0.0.1:{free_port()}"]
    workers = [spawn("worker", "--port", str(grpc_port), "--rank", str(rank), *TINY, *layout)
               for rank in range(world)]
    scheduler = spawn("scheduler", "--port", str(sched_port), "--worker", f"127.0.0.1:{grpc_port}",
                      "--model", "dummy:tiny", "--chunk-size", "64",
                      # fail fast: with replay (the default) its stream would wait for the replica
                      "--on-replica-loss", "fail", "--replica-wait-seconds", "0")
    return f"127.0.0.1:{sched_port}", workers, {"scheduler": scheduler}


@pytest.mark.parametrize("tp,pp,victim", [(2, 1, 1), pytest.param(1, 2, 1, marks=pytest.mark.slow),
                                          pytest.param(1, 2, 0, marks=pytest.mark.slow)],
                         ids=["tp2-kill-rank1", "pp2-kill-last-stage", "pp2-kill-rank0"])
def test_killing_one_worker_fails_the_replica_unavailable_within_10s(tp, pp, victim):
    address, workers, others = start_replica(tp, pp)
    try:
        wait_serving(address, timeout=180)
        stub = generation_pb2_grpc.GenerationStub(grpc.insecure_channel(address))
        stream = stub.Generate(greedy_request(list(range(200, 260)), 1900))
        next(stream)
        kill(workers[victim], signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            collect(stream)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - start < 10
        assert health_status(address) == health_pb2.HealthCheckResponse.NOT_SERVING
        # The survivors notice the silence (heartbeats) and exit on their own: nothing hangs.
        for w in workers:
            w.wait(timeout=max(0.1, start + 10 - time.monotonic()))
        assert time.monotonic() - start < 10
    finally:
        for p in [*workers, *others.values()]:
            kill(p, signal.SIGKILL)


def test_a_local_rank_that_dies_at_start_ends_its_worker_at_once():
    """`sarathi worker --tensor-parallel-size 2` starts rank 1 itself; if rank 1 dies before the
    replica is up, rank 0 would wait for it in the collective rendezvous for minutes."""
    import psutil

    worker = spawn("worker", "--port", str(free_port()), "--tensor-parallel-size", "2", *TINY)
    try:
        deadline = time.monotonic() + 60
        peers: list = []
        while not peers and time.monotonic() < deadline:
            peers = [p for p in psutil.Process(worker.pid).children() if "--rank" in p.cmdline()]
            time.sleep(0.05)
        assert peers, "rank 0 started no peer"
        peers[0].kill()
        start = time.monotonic()
        assert worker.wait(timeout=15) != 0
        assert time.monotonic() - start < 10
    finally:
        kill(worker, signal.SIGKILL)


def test_a_layout_the_model_cannot_split_into_ends_the_worker_with_one_line():
    # dummy:tiny has an MLP of 256: three ranks cannot share it. No rank is started.
    proc = subprocess.run([sys.executable, "-m", "sarathi.cli", "worker", "--port", str(free_port()),
                           "--tensor-parallel-size", "3", *TINY], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "worker: dummy:tiny does not fit --tensor-parallel-size 3 --pipeline-parallel-size 1: "
        "intermediate size 256 does not split over 3 ranks")
    assert "Traceback" not in proc.stderr

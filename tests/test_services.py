"""The two services as separate processes: health, reflection, worker failure, the demo command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
from conftest import ROOT, collect, greedy_request
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from sarathi.client import wait_serving
from sarathi_common.net import free_port


def spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sarathi.cli", *args], cwd=ROOT,
                            start_new_session=True)


def kill(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        proc.wait(15)


def health_status(address: str) -> int:
    with grpc.insecure_channel(address) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2).status


@pytest.fixture
def split_services(request):
    """A scheduler started before its worker exists, then the worker (scheduler options from the
    test's `scheduler_args` marker)."""
    marker = request.node.get_closest_marker("scheduler_args")
    extra = marker.args if marker else ()
    worker_port, port = free_port(), free_port()
    procs: dict[str, subprocess.Popen] = {}
    address = f"127.0.0.1:{port}"

    def start_worker() -> None:
        procs["worker"] = spawn("worker", "--port", str(worker_port), "--threads", "1")

    procs["scheduler"] = spawn("scheduler", "--port", str(port), "--worker", f"127.0.0.1:{worker_port}",
                               "--chunk-size", "64", *extra)
    yield address, start_worker, procs
    for p in procs.values():
        kill(p, signal.SIGKILL)


def test_health_is_serving_only_once_the_worker_has_its_cache(split_services):
    address, start_worker, _ = split_services
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            status = health_status(address)
            break
        except grpc.RpcError:
            time.sleep(0.2)
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    start_worker()
    wait_serving(address, timeout=120)
    assert health_status(address) == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services(default_server):
    with grpc.insecure_channel(default_server.address) as ch:
        services = set(ProtoReflectionDescriptorDatabase(ch).get_services())
    assert {"sarathi.v1.Generation", "grpc.health.v1.Health"} <= services


@pytest.mark.scheduler_args("--on-replica-loss", "fail", "--replica-wait-seconds", "0")
def test_failing_fast_killing_the_worker_fails_requests_unavailable_and_health_not_serving(split_services):
    address, start_worker, procs = split_services
    start_worker()
    wait_serving(address, timeout=120)
    from protos import generation_pb2_grpc

    stub = generation_pb2_grpc.GenerationStub(grpc.insecure_channel(address))
    stream = stub.Generate(greedy_request(list(range(200, 260)), 5000))
    next(stream)
    kill(procs["worker"], signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        collect(stream)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - start < 10
    assert health_status(address) == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.RpcError) as err:
        collect(stub.Generate(greedy_request([5, 6, 7], 2)))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_demo_command_starts_both_services_and_streams_a_chat_answer():
    out = subprocess.run([sys.executable, "-m", "sarathi.cli", "demo", "What is the capital of France?",
                          "--max-tokens", "24"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Paris" in out.stdout
    assert "first token" in out.stderr


def test_generated_protobuf_code_matches_the_protos():
    out = subprocess.run([sys.executable, "-m", "protos.generate", "--check"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_serve_exits_with_an_error_when_the_engine_cannot_start():
    # A KV cache of zero blocks can hold nothing: the engine fails before serving.
    out = subprocess.run([sys.executable, "-m", "sarathi.cli", "serve", "--port", str(free_port()),
                          "--num-kv-blocks", "0", "--threads", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "the engine failed before serving" in out.stderr


@pytest.mark.parametrize("replica", [(), ("--model", "dummy:tiny", "--tensor-parallel-size", "2")],
                         ids=["one-worker", "tp2-ranks-started-by-rank-0"])
def test_killing_serve_outright_leaves_no_worker_or_engine_behind(replica):
    import psutil

    port = free_port()
    serve = spawn("serve", "--port", str(port), "--threads", "1", "--cpu-cache-gib", "0.25", *replica)
    try:
        wait_serving(f"127.0.0.1:{port}", timeout=120, proc=serve)
        children = psutil.Process(serve.pid).children(recursive=True)
        workers = [p for p in children if "worker_service" in p.cmdline()]  # python -m worker_service
        assert len(workers) == (2 if replica else 1)  # rank 1 is rank 0's child
        assert len(children) >= 2  # the worker(s) and the engine (and helpers)
        serve.send_signal(signal.SIGKILL)  # no chance to clean up: the kernel must do it
        serve.wait(10)
        gone, alive = psutil.wait_procs(children, timeout=15)
        assert not alive, f"left behind: {[p.cmdline()[:4] for p in alive]}"
    finally:
        kill(serve, signal.SIGKILL)

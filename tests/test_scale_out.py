"""Scale-out and recovery with real processes: workers join a running scheduler, one scheduler
drives several replicas, and a lost worker (kill -9, SIGSTOP), a restarted worker or a killed
engine process costs its clients only a delay: every stream ends with exactly the tokens of an
undisturbed run, and no KV block is left in use. SIGTERM drains every role."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import psutil
import pytest
import torch
from conftest import ROOT, greedy_request, wait_http
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import generation_pb2_grpc
from sarathi.client import wait_serving
from sarathi_common.net import free_port

pytestmark = pytest.mark.slow

PROMPTS = [[200 + 7 * i + j for j in range(24 + i % 5)] for i in range(16)]
NEW_TOKENS = 48
WORKER = ("--threads", "1", "--cpu-cache-gib", "0.25")


def spawn(*args: str) -> subprocess.Popen:
    # No preexec_fn: the test process has threads (streams, gRPC), and running Python in a forked
    # child of a threaded process can deadlock on a lock another thread held. Each process gets
    # its own group, and the fixtures stop them.
    return subprocess.Popen([sys.executable, "-m", "sarathi.cli", *args], cwd=ROOT, start_new_session=True)


def stop(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        proc.wait(30)


class Cluster:
    """A scheduler and its workers, each in its own process group."""

    def __init__(self, *scheduler_args: str) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.scheduler = spawn("scheduler", "--port", str(self.port), "--metrics-port",
                               str(self.metrics_port), "--chunk-size", "64", *scheduler_args)
        self.workers: dict[str, subprocess.Popen] = {}

    def worker(self, name: str, *args: str, port: int | None = None) -> int:
        port = port or free_port()
        self.workers[name] = spawn("worker", "--port", str(port), *WORKER, *args)
        return port

    def join(self, name: str) -> int:
        return self.worker(name, "--scheduler", self.address)

    def health(self) -> int:
        with grpc.insecure_channel(self.address) as ch:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2).status

    def metrics(self) -> dict[str, float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read()
        values = {}
        for line in text.decode().splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    def wait_replicas(self, n: int, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.metrics().get("sarathi_replicas_serving") == n:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"{n} replicas were not serving within {timeout:.0f} s")

    def close(self) -> None:
        for proc in [*self.workers.values(), self.scheduler]:
            stop(proc)


@pytest.fixture
def cluster_factory():
    started: list[Cluster] = []

    def factory(*args: str) -> Cluster:
        started.append(Cluster(*args))
        return started[-1]

    yield factory
    for c in started:
        c.close()


class Streams:
    """Greedy streams in threads; `tokens[i]` grows as request i's chunks arrive."""

    def __init__(self, address: str, prompts: list[list[int]], max_tokens: int = NEW_TOKENS) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = generation_pb2_grpc.GenerationStub(self.channel)
        self.tokens: list[list[int]] = [[] for _ in prompts]
        self.pool = ThreadPoolExecutor(len(prompts))
        self.futures = [self.pool.submit(self._run, i, p, max_tokens) for i, p in enumerate(prompts)]

    def _run(self, i: int, prompt: list[int], max_tokens: int) -> str:
        finished = None
        for msg in self.stub.Generate(greedy_request(prompt, max_tokens), timeout=300):
            if msg.HasField("chunk"):
                self.tokens[i].extend(msg.chunk.token_ids)
            else:
                finished = msg.finished
        assert finished is not None
        return generation_pb2_name(finished.reason)

    def wait_tokens(self, at_least: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while min(len(t) for t in self.tokens) < at_least:
            assert time.monotonic() < deadline, f"streams stalled: {[len(t) for t in self.tokens]}"
            for f in self.futures:
                if f.done():
                    f.result()   # raises what failed
            time.sleep(0.05)

    def results(self, timeout: float = 300) -> list[list[int]]:
        for f in self.futures:
            assert f.result(timeout=timeout) == "length"
        self.pool.shutdown()
        self.channel.close()
        return self.tokens


def generation_pb2_name(reason: int) -> str:
    from protos import generation_pb2

    return generation_pb2.FinishReason.Name(reason).removeprefix("FINISH_REASON_").lower()


def undisturbed(address: str, prompts: list[list[int]]) -> list[list[int]]:
    return Streams(address, prompts).results()


def assert_no_blocks_used(cluster: Cluster) -> None:
    deadline = time.monotonic() + 10
    while cluster.metrics()["sarathi_kv_blocks_used"] != 0:
        assert time.monotonic() < deadline, "KV blocks still in use after every request finished"
        time.sleep(0.1)


def replica_iterations(cluster: Cluster) -> dict[str, float]:
    return {k.split('"')[1]: v for k, v in cluster.metrics().items()
            if k.startswith("sarathi_replica_iterations_total{")}


def test_workers_join_a_scheduler_that_started_with_none_and_one_leaves_by_sigterm(cluster_factory):
    cluster = cluster_factory()
    deadline = time.monotonic() + 60
    while True:
        try:
            assert cluster.health() == health_pb2.HealthCheckResponse.NOT_SERVING
            break
        except grpc.RpcError:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    cluster.join("a")
    wait_serving(cluster.address, timeout=180)
    cluster.join("b")
    cluster.wait_replicas(2)
    reference = undisturbed(cluster.address, PROMPTS[:8])
    assert set(replica_iterations(cluster)) == {"1", "2"}, "both replicas serve requests"
    streams = Streams(cluster.address, PROMPTS[:8])
    streams.wait_tokens(4)
    stop(cluster.workers["a"], signal.SIGTERM)      # leaves: its requests move to b
    assert cluster.workers["a"].returncode == 0
    assert streams.results() == reference
    assert_no_blocks_used(cluster)


def test_killing_one_of_two_replicas_mid_stream_costs_its_clients_only_a_delay(cluster_factory):
    cluster = cluster_factory()
    cluster.join("a")
    cluster.join("b")
    cluster.wait_replicas(2)
    reference = undisturbed(cluster.address, PROMPTS)
    streams = Streams(cluster.address, PROMPTS)
    streams.wait_tokens(8)
    stop(cluster.workers["a"], signal.SIGKILL)
    assert streams.results() == reference
    assert_no_blocks_used(cluster)
    assert cluster.metrics()["sarathi_requests_replayed_total"] > 0


def test_a_stopped_worker_is_dropped_within_the_step_timeout_and_rejoins_after_sigcont(cluster_factory):
    cluster = cluster_factory("--step-timeout-seconds", "4")
    cluster.join("a")
    cluster.join("b")
    cluster.wait_replicas(2)
    reference = undisturbed(cluster.address, PROMPTS[:8])
    streams = Streams(cluster.address, PROMPTS[:8])
    streams.wait_tokens(4)
    os.killpg(cluster.workers["a"].pid, signal.SIGSTOP)
    stopped = time.monotonic()
    cluster.wait_replicas(1, timeout=30)
    assert time.monotonic() - stopped < 4 + 5, "the stopped worker was found within the step timeout"
    assert streams.results() == reference
    os.killpg(cluster.workers["a"].pid, signal.SIGCONT)
    cluster.wait_replicas(2, timeout=60)           # its next Join: dialled again, a clean stream
    assert undisturbed(cluster.address, PROMPTS[:8]) == reference
    assert_no_blocks_used(cluster)


def test_a_restarted_worker_resumes_the_streams_of_the_only_replica(cluster_factory):
    worker_port = free_port()
    cluster = cluster_factory("--worker", f"127.0.0.1:{worker_port}", "--replica-wait-seconds", "120")
    cluster.worker("a", port=worker_port)
    wait_serving(cluster.address, timeout=180)
    reference = undisturbed(cluster.address, PROMPTS[:4])
    streams = Streams(cluster.address, PROMPTS[:4])
    streams.wait_tokens(4)
    stop(cluster.workers["a"], signal.SIGKILL)
    cluster.wait_replicas(0, timeout=30)
    cluster.worker("a", port=worker_port)           # the same address: the scheduler dials it again
    assert streams.results() == reference
    assert [len(t) for t in undisturbed(cluster.address, PROMPTS[4:6])] == [NEW_TOKENS] * 2  # new ones run
    assert_no_blocks_used(cluster)
    assert cluster.scheduler.poll() is None


def engine_process(scheduler: subprocess.Popen) -> psutil.Process:
    children = psutil.Process(scheduler.pid).children(recursive=True)
    engines = [p for p in children if "spawn_main" in " ".join(p.cmdline())]
    assert len(engines) == 1, [p.cmdline() for p in children]
    return engines[0]


def test_killing_the_engine_process_restarts_it_and_the_streams_continue(cluster_factory):
    worker_port = free_port()
    cluster = cluster_factory("--worker", f"127.0.0.1:{worker_port}")
    cluster.worker("a", port=worker_port)
    wait_serving(cluster.address, timeout=180)
    reference = undisturbed(cluster.address, PROMPTS[:4])
    streams = Streams(cluster.address, PROMPTS[:4])
    streams.wait_tokens(4)
    first = engine_process(cluster.scheduler)
    first.kill()
    killed = time.monotonic()
    first.wait(10)
    wait_serving(cluster.address, timeout=10)
    assert time.monotonic() - killed < 10
    assert engine_process(cluster.scheduler).pid != first.pid
    assert streams.results() == reference
    assert_no_blocks_used(cluster)


@pytest.mark.parametrize("role", ["serve", "scheduler", "worker"])
def test_sigterm_lets_the_streams_in_flight_finish_then_exits_0(cluster_factory, role):
    if role == "serve":
        port = free_port()
        address = f"127.0.0.1:{port}"
        target = spawn("serve", "--port", str(port), "--chunk-size", "64", *WORKER)
        everything = [target]
    else:
        cluster = cluster_factory()
        cluster.join("a")
        address = cluster.address
        target = cluster.scheduler if role == "scheduler" else cluster.workers["a"]
        everything = [cluster.scheduler, cluster.workers["a"]]
    try:
        wait_serving(address, timeout=180)
        family = [p for proc in everything for p in psutil.Process(proc.pid).children(recursive=True)]
        streams = Streams(address, PROMPTS[:8], max_tokens=32)
        streams.wait_tokens(2)
        target.send_signal(signal.SIGTERM)
        if role != "worker":   # the scheduler takes no new calls while it drains
            time.sleep(0.5)
            with pytest.raises(grpc.RpcError) as err:
                Streams(address, PROMPTS[8:9]).results()
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        tokens = streams.results()
        assert all(len(t) == 32 for t in tokens)
        assert target.wait(60) == 0
        if role == "serve":
            gone, alive = psutil.wait_procs(family, timeout=15)
            assert not alive, f"left behind: {[p.cmdline()[:4] for p in alive]}"
    finally:
        stop(target)


def test_serve_runs_data_parallel_replicas_under_one_scheduler():
    port, metrics_port = free_port(), free_port()
    serve = spawn("serve", "--port", str(port), "--metrics-port", str(metrics_port), "--chunk-size", "64",
                  "--replicas", "2", *WORKER)
    try:
        address = f"127.0.0.1:{port}"
        wait_serving(address, timeout=180)
        view = Cluster.__new__(Cluster)          # read-only helpers over serve's own ports
        view.address, view.metrics_port = address, metrics_port
        view.wait_replicas(2)
        assert all(len(t) == NEW_TOKENS for t in undisturbed(address, PROMPTS[:8]))
        assert set(replica_iterations(view)) == {"1", "2"}
    finally:
        stop(serve, signal.SIGTERM)
    assert serve.returncode == 0


def serve_child(serve: subprocess.Popen, module: str, timeout: float = 60) -> psutil.Process:
    """serve's one child running `module` (once the tie wrapper has exec'd it)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [p for p in psutil.Process(serve.pid).children()
                 if f"-m {module}" in " ".join(p.cmdline()) and "sarathi_common.tied" not in p.cmdline()]
        if found or time.monotonic() > deadline:
            assert len(found) == 1, [p.cmdline() for p in psutil.Process(serve.pid).children()]
            return found[0]
        time.sleep(0.1)


def worker_child(serve: subprocess.Popen) -> psutil.Process:
    return serve_child(serve, "worker_service")


def test_serve_starts_its_worker_again_after_kill_9_and_the_streams_finish_exactly():
    port = free_port()
    address = f"127.0.0.1:{port}"
    serve = spawn("serve", "--port", str(port), "--chunk-size", "64", *WORKER)
    try:
        wait_serving(address, timeout=180)
        reference = undisturbed(address, PROMPTS[:4])
        first = worker_child(serve)
        streams = Streams(address, PROMPTS[:4])
        streams.wait_tokens(4)
        first.kill()
        assert streams.results() == reference
        assert worker_child(serve).pid != first.pid
        assert serve.poll() is None
    finally:
        stop(serve, signal.SIGTERM)
    assert serve.returncode == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_serve_whose_worker_cannot_start_exits_1_with_one_line(tmp_path):
    # A worker flag this machine cannot honour; the scheduler itself starts fine.
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        serve = subprocess.Popen([sys.executable, "-m", "sarathi.cli", "serve", "--port", str(free_port()),
                                  "--model", "dummy:tiny", "--device", "cuda", *WORKER],
                                 cwd=ROOT, start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
        try:
            assert serve.wait(120) == 1
        finally:
            stop(serve)
    text = log.read_text()
    last = text.strip().splitlines()[-1]
    assert "worker: --device cuda, but torch" in text   # the worker's own reason
    assert last.startswith("serve: the worker exited with code 1 before it listened on 127.0.0.1:"), last


def test_serve_stops_with_exit_0_when_its_worker_is_stopped_on_purpose():
    port = free_port()
    serve = spawn("serve", "--port", str(port), "--chunk-size", "64", *WORKER)
    try:
        wait_serving(f"127.0.0.1:{port}", timeout=180)
        worker = worker_child(serve)
        worker.send_signal(signal.SIGTERM)
        assert serve.wait(60) == 0
        assert not worker.is_running()
    finally:
        stop(serve)


def test_serve_starts_its_gateway_again_after_kill_9():
    port, http_port = free_port(), free_port()
    serve = spawn("serve", "--port", str(port), "--http-port", str(http_port), *WORKER)
    health = f"http://127.0.0.1:{http_port}/health"
    try:
        wait_serving(f"127.0.0.1:{port}", timeout=180)
        wait_http(health, 60)
        first = serve_child(serve, "sarathi.gateway")
        first.kill()
        first.wait(10)
        wait_http(health, 60)
        assert serve_child(serve, "sarathi.gateway").pid != first.pid
        assert serve.poll() is None
    finally:
        stop(serve, signal.SIGTERM)
    assert serve.returncode == 0

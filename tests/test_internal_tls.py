"""The deployment's own links (issue 21): mutual TLS between scheduler and worker (the worker
port, Join on the scheduler's internal port), a worker that serves only the scheduler attached
to it, unary calls that cannot hold a worker thread, and no key or token in any log. Real
processes, real gRPC; certificates from deploy/dev-certs.sh."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from conftest import ROOT, collect, greedy_request, hf_greedy, make_dev_certs, serve_executor
from test_worker_hardening import new_seq, plan
from test_worker_step_stream import FakeExecutor

from protos import generation_pb2_grpc, worker_pb2_grpc
from protos import worker_pb2 as wpb
from sarathi.client import wait_serving
from sarathi_common.auth import InternalTLS
from sarathi_common.net import free_port
from scheduler_service.worker_link import WorkerLink, WorkerUnavailable
from worker_service import memory
from worker_service import server as server_module

TOKEN = "internal-tls-test-token"
BLOCK_SIZE = 16
# A channel of its own: gRPC shares one connection among a process's channels to one address,
# and without certificates the worker tells callers apart by their connection.
OWN_CONNECTION = ("grpc.use_local_subchannel_pool", 1)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    out = make_dev_certs(tmp_path_factory.mktemp("certs"))
    (out / "token").write_text(TOKEN + "\n")
    return out


def tls_flags(certs: Path, role: str) -> list[str]:
    return ["--internal-ca-file", str(certs / "ca.pem"), "--internal-cert-file", str(certs / f"{role}.pem"),
            "--internal-key-file", str(certs / f"{role}.key")]


def tls(certs: Path, role: str) -> InternalTLS:
    return InternalTLS(str(certs / "ca.pem"), str(certs / f"{role}.pem"), str(certs / f"{role}.key"))


def secure_channel(address: str, certs: Path, role: str, peer: str = "sarathi-worker") -> grpc.Channel:
    t = tls(certs, role)
    return grpc.secure_channel(address, t.channel_credentials(),
                               options=[*t.channel_options(peer), OWN_CONNECTION])


@dataclass
class Process:
    proc: subprocess.Popen
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def spawn(log: Path, *args: str) -> Process:
    # No preexec_fn: the test process has gRPC threads (see test_scale_out.spawn).
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "sarathi.cli", *args], cwd=ROOT,
                                start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
    return Process(proc, log)


def wait_describe(stub: worker_pb2_grpc.WorkerStub, proc: Process, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            stub.Describe(wpb.DescribeRequest(block_size=BLOCK_SIZE), timeout=5)
            return
        except grpc.RpcError:
            assert proc.proc.poll() is None, proc.log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the worker did not answer in time"
            time.sleep(0.3)


# --- a worker alone, behind mutual TLS -----------------------------------------------------------
@pytest.fixture(scope="module")
def tls_worker(certs, tmp_path_factory) -> Iterator[str]:
    port = free_port()
    worker = spawn(tmp_path_factory.mktemp("logs") / "worker.log", "worker", "--port", str(port),
                   "--model", "dummy:tiny", "--threads", "1", *tls_flags(certs, "worker"))
    address = f"127.0.0.1:{port}"
    try:
        with secure_channel(address, certs, "scheduler") as channel:
            wait_describe(worker_pb2_grpc.WorkerStub(channel), worker)
        yield address
    finally:
        worker.stop()


def describe_error(channel: grpc.Channel) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        worker_pb2_grpc.WorkerStub(channel).Describe(wpb.DescribeRequest(block_size=BLOCK_SIZE), timeout=10)
    return err.value


def test_plaintext_to_an_mtls_worker_port_fails(tls_worker):
    with grpc.insecure_channel(tls_worker, options=[OWN_CONNECTION]) as channel:
        assert describe_error(channel).code() == grpc.StatusCode.UNAVAILABLE


def test_a_scheduler_without_a_ca_signed_certificate_cannot_connect_to_a_worker(tls_worker, certs):
    # The scheduler's own link code, with another CA's certificate and with none.
    foreign = InternalTLS(str(certs / "ca.pem"), str(certs / "other" / "scheduler.pem"),
                          str(certs / "other" / "scheduler.key"))
    link = WorkerLink(tls_worker, foreign, "sarathi-worker")
    with pytest.raises(WorkerUnavailable):
        link.connect(timeout=5, block_size=BLOCK_SIZE, memory_fraction=0.9, token_budget=64,
                     num_kv_blocks=16, num_host_blocks=0)
    link.close()
    server_auth_only = grpc.ssl_channel_credentials((certs / "ca.pem").read_bytes())
    with grpc.secure_channel(tls_worker, server_auth_only, options=[
            ("grpc.ssl_target_name_override", "sarathi-worker"), OWN_CONNECTION]) as channel:
        assert describe_error(channel).code() == grpc.StatusCode.UNAVAILABLE


def test_the_scheduler_checks_the_workers_certificate_name(tls_worker, certs):
    # The router's certificate is signed by the same CA but does not name a worker.
    link = WorkerLink(tls_worker, tls(certs, "scheduler"), "sarathi-router")
    with pytest.raises(WorkerUnavailable):
        link.connect(timeout=5, block_size=BLOCK_SIZE, memory_fraction=0.9, token_budget=64,
                     num_kv_blocks=16, num_host_blocks=0)
    link.close()


def test_a_restarted_scheduler_with_the_same_certificate_replaces_its_stream_and_others_are_refused(
        tls_worker, certs):
    first = secure_channel(tls_worker, certs, "scheduler")
    stub = worker_pb2_grpc.WorkerStub(first)
    stub.InitCache(wpb.InitCacheRequest(num_blocks=64, block_size=BLOCK_SIZE), timeout=30)
    gate = threading.Event()

    def requests():   # one plan, then the stream stays open (no half-close)
        yield plan()
        gate.wait(60)

    results = stub.Step(requests(), timeout=60)
    assert list(next(results).seq_ids) == [7]
    # The same scheduler again, on a new connection (a restart): it attaches at once...
    with secure_channel(tls_worker, certs, "scheduler") as again:
        worker_pb2_grpc.WorkerStub(again).InitCache(
            wpb.InitCacheRequest(num_blocks=64, block_size=BLOCK_SIZE), timeout=30)
        # ...and its old stream is over.
        with pytest.raises(grpc.RpcError) as err:
            next(results)
        assert err.value.code() == grpc.StatusCode.CANCELLED
        # Another certificate of the deployment is not that scheduler.
        with secure_channel(tls_worker, certs, "router") as other, pytest.raises(grpc.RpcError) as err:
            worker_pb2_grpc.WorkerStub(other).InitCache(
                wpb.InitCacheRequest(num_blocks=8, block_size=BLOCK_SIZE), timeout=30)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "serves another scheduler" in err.value.details()
        # The attached scheduler's stream ends: the worker is free for the next one.
        list(worker_pb2_grpc.WorkerStub(again).Step(iter([plan()]), timeout=30))
    gate.set()
    first.close()
    with secure_channel(tls_worker, certs, "router") as other:
        worker_pb2_grpc.WorkerStub(other).InitCache(
            wpb.InitCacheRequest(num_blocks=64, block_size=BLOCK_SIZE), timeout=30)


# --- a plaintext worker: no stranger can hold its threads ----------------------------------------
@pytest.fixture(scope="module")
def plain_worker(tmp_path_factory) -> Iterator[str]:
    port = free_port()
    worker = spawn(tmp_path_factory.mktemp("logs") / "plain.log", "worker", "--port", str(port),
                   "--model", "dummy:tiny", "--threads", "1")
    address = f"127.0.0.1:{port}"
    try:
        with grpc.insecure_channel(address, options=[OWN_CONNECTION]) as channel:
            wait_describe(worker_pb2_grpc.WorkerStub(channel), worker)
        yield address
    finally:
        worker.stop()


def test_hanging_unary_calls_do_not_exhaust_the_worker(plain_worker):
    """As many calls as the worker has threads open InitCache and never send its request: each
    is cut after REQUEST_WAIT_S, and a scheduler's Describe is answered meanwhile or right after."""
    release = threading.Event()

    def nothing():
        release.wait(120)
        yield from ()

    strangers = [grpc.insecure_channel(plain_worker, options=[OWN_CONNECTION])
                 for _ in range(server_module.THREADS)]
    try:
        start = time.monotonic()
        hanging = [ch.stream_unary("/sarathi.v1.Worker/InitCache").future(nothing()) for ch in strangers]
        time.sleep(0.5)
        with grpc.insecure_channel(plain_worker, options=[OWN_CONNECTION]) as channel:
            info = worker_pb2_grpc.WorkerStub(channel).Describe(wpb.DescribeRequest(block_size=BLOCK_SIZE),
                                                                timeout=server_module.REQUEST_WAIT_S + 5)
        assert info.num_layers > 0
        for call in hanging:
            with pytest.raises(grpc.RpcError):
                call.result(timeout=server_module.REQUEST_WAIT_S + 5)
        assert time.monotonic() - start < server_module.REQUEST_WAIT_S + 5
    finally:
        release.set()
        for ch in strangers:
            ch.close()


def assert_turned_away(stranger: worker_pb2_grpc.WorkerStub) -> None:
    """A caller other than the attached scheduler: InitCache and Step both refused, saying why."""
    for call in (lambda: stranger.InitCache(wpb.InitCacheRequest(num_blocks=1, block_size=BLOCK_SIZE),
                                            timeout=30),
                 lambda: list(stranger.Step(iter([plan()]), timeout=30))):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
        assert "serves another scheduler" in err.value.details()


def test_a_second_client_cannot_init_cache_or_open_step_on_an_attached_plaintext_worker(plain_worker):
    with grpc.insecure_channel(plain_worker, options=[OWN_CONNECTION]) as mine, \
            grpc.insecure_channel(plain_worker, options=[OWN_CONNECTION]) as theirs:
        stub, stranger = worker_pb2_grpc.WorkerStub(mine), worker_pb2_grpc.WorkerStub(theirs)
        stub.InitCache(wpb.InitCacheRequest(num_blocks=64, block_size=BLOCK_SIZE), timeout=30)
        assert_turned_away(stranger)
        # The attached client's cache is the one it asked for: a plan using its last block runs.
        (result,) = stub.Step(iter([plan(new_sequences=new_seq(block_table=[63]))]), timeout=30)
        assert list(result.seq_ids) == [7]


# --- Describe: no profiling for a stranger -------------------------------------------------------
class CountsProfiles(FakeExecutor):
    """A stand-in executor on an accelerator-like device (anything but the CPU is profiled)."""

    device = torch.device("meta")

    def __init__(self) -> None:
        super().__init__()
        self.profiles = 0
        self.asked: tuple[int, float, int] | None = None

    def profile_free_memory(self, max_num_tokens: int, fraction: float = 0.9, max_num_seqs: int = 0) -> int:
        self.profiles += 1
        self.asked = (max_num_tokens, fraction, max_num_seqs)
        return 1 << 20


def test_the_worker_profiles_the_schedulers_budget_and_batch_size():
    """The scheduler's link tells the worker its largest batch: a step samples one row per
    sequence, so logits and the LM head's warm-up are sized by it."""
    executor = CountsProfiles()
    server, port = serve_executor(executor)
    link = WorkerLink(f"127.0.0.1:{port}")
    try:
        info = link.connect(timeout=10, block_size=16, memory_fraction=0.8, token_budget=2048,
                            num_kv_blocks=None, num_host_blocks=0, max_num_seqs=512)
        assert executor.asked == (2048, pytest.approx(0.8), 512)
        assert info.num_blocks == (1 << 20) // 16
    finally:
        link.close()
        server.stop(0)


def test_a_step_samples_at_most_one_row_per_sequence_and_per_token():
    assert memory.sampled_rows(2048, 512) == 512
    assert memory.sampled_rows(128, 512) == 128          # a budget of 128 tokens samples <= 128
    assert memory.sampled_rows(2048, 0) == memory.LOGIT_ROWS   # an older scheduler says nothing


def test_describe_from_a_stranger_does_no_profiling():
    executor = CountsProfiles()
    server, port = serve_executor(executor)
    address = f"127.0.0.1:{port}"
    try:
        with grpc.insecure_channel(address, options=[OWN_CONNECTION]) as mine, \
                grpc.insecure_channel(address, options=[OWN_CONNECTION]) as theirs:
            stub, stranger = worker_pb2_grpc.WorkerStub(mine), worker_pb2_grpc.WorkerStub(theirs)
            request = wpb.DescribeRequest(block_size=16, max_num_batched_tokens=512)
            assert stub.Describe(request, timeout=10).num_blocks_available == (1 << 20) // 16
            stub.Describe(request, timeout=10)                       # profiled once per input
            stub.InitCache(wpb.InitCacheRequest(num_blocks=8, block_size=16), timeout=10)
            assert executor.profiles == 1
            # The stranger gets the profile already made, and no new one for another input.
            assert stranger.Describe(request, timeout=10).num_blocks_available == (1 << 20) // 16
            with pytest.raises(grpc.RpcError) as err:
                stranger.Describe(wpb.DescribeRequest(block_size=16, max_num_batched_tokens=8192), timeout=10)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert executor.profiles == 1
    finally:
        server.stop(0)


# --- scheduler + worker, both behind mutual TLS --------------------------------------------------
@dataclass
class Cluster:
    address: str
    internal: str
    scheduler: Process
    worker: Process
    worker_address: str


@pytest.fixture(scope="module")
def cluster(certs, tmp_path_factory) -> Iterator[Cluster]:
    logs = tmp_path_factory.mktemp("logs")
    port, internal, worker_port = free_port(), free_port(), free_port()
    scheduler = spawn(logs / "scheduler.log", "scheduler", "--port", str(port),
                      "--internal-port", str(internal), "--chunk-size", "64",
                      "--token-file", str(certs / "token"), "--internal-peer-name", "sarathi-worker",
                      *tls_flags(certs, "scheduler"))
    worker = spawn(logs / "worker.log", "worker", "--port", str(worker_port), "--threads", "1",
                   "--cpu-cache-gib", "0.25", "--scheduler", f"127.0.0.1:{internal}",
                   "--internal-peer-name", "sarathi-scheduler", *tls_flags(certs, "worker"))
    c = Cluster(f"127.0.0.1:{port}", f"127.0.0.1:{internal}", scheduler, worker, f"127.0.0.1:{worker_port}")
    try:
        wait_serving(c.address, 300, scheduler.proc)
        yield c
    finally:
        worker.stop()
        scheduler.stop()


def generate(address: str, prompt: list[int], max_tokens: int) -> list[int]:
    with grpc.insecure_channel(address) as channel:
        call = generation_pb2_grpc.GenerationStub(channel).Generate(
            greedy_request(prompt, max_tokens), metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=300)
        tokens, _, _ = collect(call)
    return tokens


@pytest.mark.slow
def test_scheduler_and_worker_over_mtls_generate_exact_greedy_tokens(cluster, hf_model, long_token_ids):
    prompts = [long_token_ids[11 * i: 11 * i + n] for i, n in enumerate((9, 30, 57))]
    with ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(lambda p: generate(cluster.address, p, 16), prompts))
    assert got == [hf_greedy(hf_model, p, 16) for p in prompts]


@pytest.mark.slow
def test_a_second_client_cannot_init_cache_or_open_step_while_the_scheduler_streams(
        cluster, certs, hf_model, long_token_ids):
    prompt = long_token_ids[:40]
    with ThreadPoolExecutor(1) as pool:
        tokens = pool.submit(generate, cluster.address, prompt, 48)
        # Another holder of a deployment certificate (the router's) is not the attached scheduler.
        with secure_channel(cluster.worker_address, certs, "router") as channel:
            stranger = worker_pb2_grpc.WorkerStub(channel)
            assert_turned_away(stranger)
        assert tokens.result(timeout=300) == hf_greedy(hf_model, prompt, 48)


@pytest.mark.slow
def test_a_worker_without_a_ca_signed_certificate_cannot_join(cluster, certs):
    join = wpb.JoinRequest(address="127.0.0.1:1")
    foreign = InternalTLS(str(certs / "ca.pem"), str(certs / "other" / "worker.pem"),
                          str(certs / "other" / "worker.key"))
    attempts = {
        "another CA's certificate": grpc.secure_channel(
            cluster.internal, foreign.channel_credentials(), options=[OWN_CONNECTION]),
        "no certificate": grpc.secure_channel(
            cluster.internal, grpc.ssl_channel_credentials((certs / "ca.pem").read_bytes()),
            options=[OWN_CONNECTION]),
        "plaintext": grpc.insecure_channel(cluster.internal, options=[OWN_CONNECTION]),
    }
    for case, channel in attempts.items():
        with channel, pytest.raises(grpc.RpcError) as err:
            worker_pb2_grpc.MembershipStub(channel).Join(join, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, case
    # The public API port takes no joins at all once internal TLS is on.
    with grpc.insecure_channel(cluster.address) as channel, pytest.raises(grpc.RpcError) as err:
        worker_pb2_grpc.MembershipStub(channel).Join(join, timeout=10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.slow
def test_no_key_or_token_appears_in_any_log(cluster, certs):
    generate(cluster.address, [100, 200, 300], 2)   # some traffic first
    secrets = [TOKEN] + [line for role in ("scheduler", "worker") for line in
                         (certs / f"{role}.key").read_text().splitlines() if "PRIVATE KEY" not in line]
    for process in (cluster.scheduler, cluster.worker):
        text = process.log.read_text()
        assert "joined" in text or "listening" in text, text[-2000:]   # the log is the real one
        leaked = [s[:8] for s in secrets if s in text]
        assert not leaked, f"{process.log.name} holds secret material"


# --- router -> scheduler API, mutual TLS ---------------------------------------------------------
@pytest.fixture(scope="module")
def tls_api_serve(certs, tmp_path_factory) -> Iterator[str]:
    """`serve` whose API takes only callers with a certificate of the deployment's CA."""
    log = tmp_path_factory.mktemp("logs") / "serve.log"
    port = free_port()
    proc = spawn(log, "serve", "--port", str(port), "--threads", "1", "--cpu-cache-gib", "0.25",
                 "--chunk-size", "64", "--tls-cert-file", str(certs / "scheduler.pem"),
                 "--tls-key-file", str(certs / "scheduler.key"),
                 "--tls-client-ca-file", str(certs / "ca.pem"))
    address = f"127.0.0.1:{port}"
    try:
        with secure_channel(address, certs, "router", peer="sarathi-scheduler") as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            deadline = time.monotonic() + 300
            while True:
                try:
                    collect(stub.Generate(greedy_request([1, 2, 3], 1), timeout=10))
                    break
                except grpc.RpcError:
                    assert proc.proc.poll() is None, log.read_text()[-3000:]
                    assert time.monotonic() < deadline, "serve did not answer in time"
                    time.sleep(1)
        yield address
    finally:
        proc.stop()


def start_router(log: Path, scheduler: str, *args: str) -> tuple[Process, str]:
    port = free_port()
    return spawn(log, "router", "--port", str(port), "--scheduler", scheduler, *args), f"127.0.0.1:{port}"


def plain_generate(address: str, prompt: list[int], max_tokens: int, timeout: float = 120) -> list[int]:
    with grpc.insecure_channel(address) as channel:
        tokens, _, _ = collect(generation_pb2_grpc.GenerationStub(channel).Generate(
            greedy_request(prompt, max_tokens), timeout=timeout))
    return tokens


@pytest.mark.slow
def test_a_router_reaches_schedulers_over_mutual_tls_checking_their_role_name(tls_api_serve, certs, tmp_path):
    router, address = start_router(tmp_path / "router.log", tls_api_serve, "--internal-peer-name",
                                   "sarathi-scheduler", *tls_flags(certs, "router"))
    try:
        wait_serving(address, 60, router.proc)
        with secure_channel(tls_api_serve, certs, "router", peer="sarathi-scheduler") as channel:
            direct, _, _ = collect(generation_pb2_grpc.GenerationStub(channel).Generate(
                greedy_request([5, 6, 7, 8], 6), timeout=120))
        assert plain_generate(address, [5, 6, 7, 8], 6) == direct
    finally:
        router.stop()


@pytest.mark.slow
@pytest.mark.parametrize("why", ["wrong role name", "no certificate"])
def test_a_router_that_cannot_authenticate_the_scheduler_or_itself_puts_nothing_in_rotation(
        tls_api_serve, certs, tmp_path, why):
    wrong_name = ("--internal-peer-name", "sarathi-worker", *tls_flags(certs, "router"))
    args = wrong_name if why == "wrong role name" else ()
    router, address = start_router(tmp_path / "router.log", tls_api_serve, *args)
    try:
        time.sleep(5)   # a few health checks
        assert router.proc.poll() is None
        with pytest.raises(grpc.RpcError) as err:
            plain_generate(address, [5, 6, 7, 8], 2, timeout=20)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        router.stop()

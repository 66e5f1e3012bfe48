"""The router in front of real schedulers (each a `sarathi serve` process: scheduler + worker on
the embedded SmolLM2), over real gRPC: exact tokens, least outstanding work against a slow
scheduler, prefix affinity with the schedulers' prefix-cache hit rate, schedulers taken out when
they die or stop, a request retried before its first token (also when its scheduler is stopped
and only health checks notice), SIGTERM draining the router, and
schedulers joining by announcing themselves.

Each response names its scheduler in the `x-sarathi-scheduler` initial metadata; where a
request went is also checked against the schedulers' own counters."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import psutil
import pytest
from conftest import LONG_TEXT, ROOT, greedy_request, wait_for

from protos import generation_pb2 as pb
from protos import generation_pb2_grpc
from sarathi.client import wait_serving
from sarathi_common.net import free_port

pytestmark = pytest.mark.slow

HEADER = "x-sarathi-scheduler"
SCHEDULER = ("--threads", "1", "--cpu-cache-gib", "0.25", "--chunk-size", "128", "--prefix-caching")


def spawn(*args: str) -> subprocess.Popen:
    # No preexec_fn (the test process has threads; see test_scale_out); its own process group.
    return subprocess.Popen([sys.executable, "-m", "sarathi.cli", *args], cwd=ROOT, start_new_session=True)


def kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        proc.wait(30)


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {name: float(value) for name, value in
            (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))}


class Scheduler:
    """`sarathi serve`: a scheduler with its worker, each scheduler its own process group."""

    def __init__(self, *args: str) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.proc = spawn("serve", "--port", str(self.port), "--metrics-port", str(self.metrics_port),
                          *SCHEDULER, *args)

    def wait(self) -> Scheduler:
        wait_serving(self.address, 300, self.proc)
        return self

    def worker_pid(self) -> int:
        children = psutil.Process(self.proc.pid).children(recursive=True)
        return next(c.pid for c in children if "worker_service" in " ".join(c.cmdline()))

    def metrics(self) -> dict[str, float]:
        return scrape(self.metrics_port)


class Router:
    def __init__(self, *args: str, wait_members: int | None = None) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.proc = spawn("router", "--port", str(self.port), "--metrics-port", str(self.metrics_port), *args)
        if wait_members is not None:   # health is SERVING once one scheduler is
            wait_serving(self.address, 60, self.proc)
        else:
            assert wait_for(self._answers, 60), "the router's metrics did not answer"
        if wait_members is not None:
            assert wait_for(lambda: self.in_rotation() == wait_members, 30), "schedulers not in rotation"

    def metrics(self) -> dict[str, float]:
        return scrape(self.metrics_port)

    def _answers(self) -> bool:
        try:
            return bool(self.metrics())
        except OSError:
            return False

    def in_rotation(self) -> float:
        return self.metrics()["sarathi_router_schedulers_in_rotation"]

    def stop(self) -> None:
        kill(self.proc, signal.SIGKILL)


def generate(address: str, request: pb.GenerateRequest,
             timeout: float = 120) -> tuple[list[int], str, pb.Finished]:
    """Tokens, the scheduler that served them (per the router), and the Finished message."""
    with grpc.insecure_channel(address) as channel:
        call = generation_pb2_grpc.GenerationStub(channel).Generate(request, timeout=timeout)
        tokens, finished = [], None
        for msg in call:
            if msg.HasField("chunk"):
                tokens += msg.chunk.token_ids
            else:
                finished = msg.finished
        assert finished is not None
        return tokens, dict(call.initial_metadata()).get(HEADER, ""), finished


def text_request(text: str, max_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(text=text, sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                                    ignore_eos=True))


@pytest.fixture(scope="module")
def schedulers():
    started = [Scheduler(), Scheduler()]   # both load at once
    try:
        yield [s.wait() for s in started]
    finally:
        for s in started:
            kill(s.proc)


@pytest.fixture
def router_factory():
    started: list[Router] = []

    def factory(*args: str, **kwargs) -> Router:
        started.append(Router(*args, **kwargs))
        return started[-1]

    yield factory
    for r in started:
        r.stop()


@pytest.fixture
def victim():
    """A scheduler of this test's own, to be killed."""
    s = Scheduler()
    try:
        yield s.wait()
    finally:
        kill(s.proc)


def members(*schedulers: Scheduler) -> tuple[str, str]:
    return ("--scheduler", ",".join(s.address for s in schedulers))


def test_greedy_tokens_through_the_router_equal_those_from_a_scheduler_directly(schedulers, router_factory):
    router = router_factory(*members(*schedulers), wait_members=2)
    requests = [greedy_request([300 + 11 * i + j for j in range(20 + 3 * i)], 24) for i in range(4)]
    requests += [text_request(f"Story {i}: the lighthouse keeper", 24) for i in range(4)]
    with ThreadPoolExecutor(8) as pool:
        routed = list(pool.map(lambda r: generate(router.address, r), requests))
    with ThreadPoolExecutor(8) as pool:
        direct = list(pool.map(lambda r: generate(schedulers[0].address, r), requests))
    assert [t for t, _, _ in routed] == [t for t, _, _ in direct]
    assert {s for _, s, _ in routed} == {s.address for s in schedulers}   # both served some


def test_least_outstanding_work_gives_a_slow_scheduler_fewer_requests(schedulers, router_factory):
    fast, slow = schedulers
    router = router_factory(*members(*schedulers), wait_members=2)
    worker = slow.worker_pid()
    done = threading.Event()

    def throttle() -> None:
        # The slow scheduler's worker runs 100 ms of every 500 ms (a starved or shared device).
        while not done.is_set():
            os.kill(worker, signal.SIGSTOP)
            done.wait(0.4)
            os.kill(worker, signal.SIGCONT)
            done.wait(0.1)

    def client(c: int) -> list[str]:
        return [generate(router.address, text_request(f"Client {c} request {i}: tell a story", 8))[1]
                for i in range(5)]

    throttler = threading.Thread(target=throttle)
    throttler.start()
    try:
        with ThreadPoolExecutor(6) as pool:
            served = Counter(s for batch in pool.map(client, range(6)) for s in batch)
    finally:
        done.set()
        throttler.join()
        os.kill(worker, signal.SIGCONT)
    print(f"\nrequests per scheduler: fast {served[fast.address]}, slow {served[slow.address]}")
    # Round robin would give each half; least outstanding work sends the slow one far fewer.
    assert served[slow.address] + served[fast.address] == 30
    assert served[slow.address] < 30 / 3


def test_prefix_affinity_keeps_a_shared_prefix_on_one_scheduler_while_load_stays_balanced(
        schedulers, router_factory):
    router = router_factory(*members(*schedulers), wait_members=2)
    prefix = LONG_TEXT * 4
    shared = [text_request(f"{prefix}\nQuestion {i}: what is the main idea?", 4) for i in range(20)]
    unrelated = [text_request(f"Unrelated {i}: {'abcdefghij'[i % 10] * 3} write a poem about the sea", 4)
                 for i in range(20)]
    before = {s.address: s.metrics() for s in schedulers}
    order = [r for pair in zip(shared, unrelated, strict=True) for r in pair]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda r: generate(router.address, r), order))
    shared_at = Counter(s for (_, s, _), r in zip(results, order, strict=True) if r in shared)
    total_at = Counter(s for _, s, _ in results)
    prompt_tokens = min(f.usage.prompt_tokens for (_, _, f), r in zip(results, order, strict=True)
                        if r in shared)
    assert prompt_tokens >= 400
    assert len(shared_at) == 1, f"the shared prefix went to {dict(shared_at)}"
    (target,) = shared_at
    assert all(n >= 12 for n in total_at.values()) and len(total_at) == 2, f"unbalanced: {dict(total_at)}"
    after = next(s for s in schedulers if s.address == target).metrics()
    hit, query = (after[f"sarathi_prefix_cache_{name}_tokens_total"]
                  - before[target][f"sarathi_prefix_cache_{name}_tokens_total"] for name in ("hit", "query"))
    print(f"\nprefix-cache hit rate at {target}: {hit / query:.2f} ({hit:.0f} of {query:.0f} prompt tokens); "
          f"requests per scheduler {dict(total_at)}")
    assert hit / query > 0.6


def test_a_router_given_a_dns_name_routes_to_the_schedulers_it_resolves_to(schedulers, router_factory):
    # localhost may also resolve to ::1, where nothing listens: that address never passes health.
    router = router_factory("--scheduler-dns", f"localhost:{schedulers[0].port}", "--dns-interval", "1",
                            wait_members=1)
    assert generate(router.address, text_request("By name", 4))[1] == schedulers[0].address


def test_a_killed_scheduler_is_out_of_rotation_within_5_seconds(schedulers, victim, router_factory):
    router = router_factory(*members(schedulers[0], victim), wait_members=2)
    kill(victim.proc)
    killed = time.monotonic()
    assert wait_for(lambda: router.in_rotation() == 1, 10, interval=0.05)
    assert time.monotonic() - killed < 5
    served = {generate(router.address, text_request(f"After {i}", 4))[1] for i in range(4)}
    assert served == {schedulers[0].address}


def test_a_stopped_scheduler_is_out_of_rotation_within_5_seconds_and_back_after_it_resumes(
        schedulers, router_factory):
    router = router_factory(*members(*schedulers), wait_members=2)
    stopped = schedulers[1]
    os.killpg(stopped.proc.pid, signal.SIGSTOP)
    start = time.monotonic()
    try:
        assert wait_for(lambda: router.in_rotation() == 1, 10, interval=0.05)
        assert time.monotonic() - start < 5
    finally:
        os.killpg(stopped.proc.pid, signal.SIGCONT)
    assert wait_for(lambda: router.in_rotation() == 2, 10)


def test_a_request_whose_scheduler_dies_before_the_first_token_is_retried_on_another(
        schedulers, victim, router_factory):
    router = router_factory(*members(schedulers[0], victim), wait_members=2)
    os.kill(victim.worker_pid(), signal.SIGSTOP)   # its requests wait for a first token for ever
    requests = [greedy_request([500 + 13 * i + j for j in range(16)], 12) for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(generate, router.address, r) for r in requests]
        assert wait_for(lambda: router.metrics().get(
            f'sarathi_router_requests_outstanding{{scheduler="{victim.address}"}}', 0) >= 1, 30)
        kill(victim.proc)
        results = [f.result(timeout=120) for f in futures]
    direct = [generate(schedulers[0].address, r)[0] for r in requests]
    assert [t for t, _, _ in results] == direct
    assert {s for _, s, _ in results} == {schedulers[0].address}
    assert router.metrics()["sarathi_router_retries_total"] >= 1


def test_requests_on_a_stopped_scheduler_are_retried_on_another_long_before_their_deadline(
        schedulers, victim, router_factory):
    """SIGSTOP: the scheduler's port still accepts connections but nothing answers. Once health
    checks time out, the router gives up its streams: those without a token go elsewhere."""
    router = router_factory(*members(schedulers[0], victim), wait_members=2)
    requests = [greedy_request([700 + 11 * i + j for j in range(16)], 8) for i in range(6)]
    os.killpg(victim.proc.pid, signal.SIGSTOP)   # scheduler and worker
    start = time.monotonic()
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda r: generate(router.address, r, timeout=120), requests))
    elapsed = time.monotonic() - start
    direct = [generate(schedulers[0].address, r)[0] for r in requests]
    assert [t for t, _, _ in results] == direct
    assert {s for _, s, _ in results} == {schedulers[0].address}
    assert router.metrics()["sarathi_router_retries_total"] >= 1
    assert elapsed < 60, f"{elapsed:.0f} s: the requests waited for their deadline"


def test_a_stream_whose_scheduler_stops_mid_flight_ends_unavailable_within_seconds(victim, router_factory):
    router = router_factory(*members(victim), wait_members=1)
    with grpc.insecure_channel(router.address) as channel:
        call = generation_pb2_grpc.GenerationStub(channel).Generate(
            greedy_request(list(range(300, 316)), 400), timeout=120)
        messages = iter(call)
        next(messages)
        os.killpg(victim.proc.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            for _ in messages:
                pass
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "retry" in err.value.details()
    assert time.monotonic() - stopped < 20


def test_sigterm_drains_the_router_streams_finish_new_calls_are_unavailable_and_it_exits_0(
        schedulers, router_factory):
    router = router_factory(*members(*schedulers), "--drain-seconds", "60", wait_members=2)
    tokens: list[list[int]] = [[] for _ in range(4)]
    reasons: list[int] = [0] * 4

    def stream(i: int) -> None:
        with grpc.insecure_channel(router.address) as channel:
            for msg in generation_pb2_grpc.GenerationStub(channel).Generate(
                    text_request(f"Drain {i}: once upon a time", 40), timeout=120):
                if msg.HasField("chunk"):
                    tokens[i] += msg.chunk.token_ids
                else:
                    reasons[i] = msg.finished.reason

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    assert wait_for(lambda: min(map(len, tokens)) >= 2, 60)
    router.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises(grpc.RpcError) as refused:
        generate(router.address, text_request("too late", 4), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    for t in threads:
        t.join(120)
    assert [len(t) for t in tokens] == [40] * 4
    assert reasons == [pb.FINISH_REASON_LENGTH] * 4
    assert router.proc.wait(30) == 0


def test_a_scheduler_started_with_router_joins_it_and_leaves_when_it_stops(router_factory):
    join_port = free_port()
    router = router_factory("--join-port", str(join_port), "--join-ttl", "3")
    assert router.in_rotation() == 0
    scheduler = Scheduler("--router", f"127.0.0.1:{join_port}").wait()
    try:
        assert wait_for(lambda: router.in_rotation() == 1, 15)
        assert generate(router.address, text_request("Joined", 4))[1] == scheduler.address
    finally:
        kill(scheduler.proc, signal.SIGTERM)
    # The router sees it go at its next health check (every second): a scheduler with nothing
    # to drain can exit before that (CI: still in rotation the moment its process ended).
    assert wait_for(lambda: router.in_rotation() == 0, 5)
    left = 'sarathi_router_scheduler_changes_total{change="left"}'
    assert wait_for(lambda: router.metrics().get(left) == 1, 10)

"""A multi-host deployment as containers on a Docker network made here: a router, two schedulers
and three CPU workers (SmolLM2), each started with its Kubernetes manifest's command and
settings, under the names the cluster's DNS would give them. Clients on the host use ports
published on 127.0.0.1.

Workers join scheduler (ordinal mod 2): workers 0 and 2 serve scheduler 0, worker 1 scheduler 1.
The tests share the deployment and run in file order: killing and adding workers, then stopping
a scheduler.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import collect, greedy_request, hf_greedy

pytestmark = pytest.mark.container

from containers import (  # noqa: E402
    SCHEDULER_IMAGE,
    WORKER_IMAGE,
    from_pod_spec,
    health,
    on_loopback,
    pod_spec,
    require_images,
    wait_serving,
)
from testcontainers.core.network import Network  # noqa: E402

NEW_TOKENS = 24
SCHEDULERS = 2
# The images are built from this tree: the router is in them when it is here.
HAS_ROUTER = (Path(__file__).resolve().parent.parent / "router_service").is_dir()
needs_router = pytest.mark.skipif(not HAS_ROUTER, reason="no router_service in this tree yet")


def worker(net: Network, ordinal: int):
    name = f"sarathi-worker-{ordinal}"
    return (from_pod_spec(WORKER_IMAGE, pod_spec("worker-cpu/worker.yaml"),
                          # A smaller KV cache than the manifest's 2 GiB: six containers share the host.
                          env={"POD_NAME": name, "SCHEDULERS": str(SCHEDULERS),
                               "SARATHI_CPU_CACHE_GIB": "0.5"})
            .with_network(net).with_network_aliases(f"{name}.sarathi-worker"))


class Deployment:
    def __init__(self, net: Network):
        self.net = net
        self.schedulers, self.scheduler_addresses, self.metrics_addresses = [], [], []
        for i in range(SCHEDULERS):
            # "sarathi-scheduler" on every scheduler: Docker's DNS answers it with all of them,
            # as the headless Service does.
            c, address = on_loopback(
                from_pod_spec(SCHEDULER_IMAGE, pod_spec("scheduler.yaml")).with_network(net)
                .with_network_aliases(f"sarathi-scheduler-{i}.sarathi-scheduler", "sarathi-scheduler"),
                50051)
            c, metrics = on_loopback(c, 9090)
            self.schedulers.append(c)
            self.scheduler_addresses.append(address)
            self.metrics_addresses.append(metrics)
        self.workers = {i: worker(net, i) for i in range(3)}
        self.gone = []   # containers a test killed or stopped: removed at the end too
        self.router, self.router_address = (on_loopback(
            from_pod_spec(SCHEDULER_IMAGE, pod_spec("router.yaml", kind="Deployment")).with_network(net),
            50051)
            if HAS_ROUTER else (None, None))

    def containers(self):
        return [*self.schedulers, *self.workers.values(), *([self.router] if self.router else []), *self.gone]

    def start(self) -> None:
        for c in self.containers():
            c.start()
        for address in self.scheduler_addresses:
            wait_serving(address, self.containers())
        if self.router:
            wait_serving(self.router_address, self.containers())

    def stop(self) -> None:
        for c in self.containers():
            try:
                c.stop()
            except Exception:   # already gone (killed by a test)
                pass


@pytest.fixture(scope="module")
def deployment():
    require_images(SCHEDULER_IMAGE, WORKER_IMAGE)
    with Network() as net:
        d = Deployment(net)
        try:
            d.start()
            yield d
        finally:
            d.stop()


@pytest.fixture(scope="module")
def prompts(long_token_ids) -> list[list[int]]:
    return [long_token_ids[5 * i: 5 * i + 3 + 9 * i] for i in range(32)]


@pytest.fixture(scope="module")
def references(hf_model, prompts) -> list[list[int]]:
    return [hf_greedy(hf_model, p, NEW_TOKENS) for p in prompts]


def run(address: str, prompts: list[list[int]], during=None, after_first: int = 4) -> list[list[int]]:
    """Streams every prompt at once; `during()` runs once `after_first` streams have their first
    token (the others still queued, prefilling or streaming: work in flight everywhere)."""
    import threading

    import grpc

    from protos import generation_pb2_grpc

    lock, started, trigger = threading.Lock(), [0], threading.Event()

    def one(prompt):
        def stream():
            for i, msg in enumerate(stub.Generate(greedy_request(prompt, NEW_TOKENS), timeout=300)):
                if i == 0:
                    with lock:
                        started[0] += 1
                        if started[0] >= after_first:
                            trigger.set()
                yield msg

        return collect(stream())[0]

    with grpc.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        with ThreadPoolExecutor(len(prompts)) as pool:
            futures = [pool.submit(one, p) for p in prompts]
            if during is not None:
                assert trigger.wait(180), "no stream started"
                during()
            return [f.result() for f in futures]


def samples(address: str, name: str) -> list:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
    return [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]


def metric(address: str, name: str) -> float:
    """A Prometheus sample's value, summed over its series (0 if none)."""
    return sum(s.value for s in samples(address, name))


@needs_router
def test_32_concurrent_greedy_requests_through_the_router_are_exact(references, prompts, deployment):
    assert run(deployment.router_address, prompts) == references


def test_a_worker_killed_mid_stream_loses_no_request(references, prompts, deployment):
    """Scheduler 0 has workers 0 and 2: `docker kill` of worker 0 once the first streams have
    tokens, both workers holding requests; the victim's continue on worker 2 from the tokens
    already sent."""
    metrics = deployment.metrics_addresses[0]
    victim = deployment.workers.pop(0)
    deployment.gone.append(victim)
    running: dict[str, float] = {}

    def kill():
        # What each replica runs right now: both must hold requests, so the victim does too.
        running.update({s.labels["replica"]: s.value
                        for s in samples(metrics, "sarathi_replica_requests_running")})
        victim.get_wrapped_container().kill()

    got = run(deployment.scheduler_addresses[0], prompts, during=kill, after_first=8)
    assert got == references
    assert len(running) == 2 and min(running.values()) > 0, f"requests running per replica: {running}"
    assert health(deployment.scheduler_addresses[0]) == "SERVING"


def test_a_new_worker_container_joins_and_takes_load(references, prompts, deployment):
    """Worker 3 joins scheduler 1 (3 mod 2) beside worker 1; the requests sent there then run
    on both (scheduler 1 had served nothing before)."""
    deployment.workers[3] = newcomer = worker(deployment.net, 3)
    newcomer.start()
    metrics = deployment.metrics_addresses[1]
    deadline = time.monotonic() + 180
    while metric(metrics, "sarathi_replicas_serving") < 2:
        assert time.monotonic() < deadline, "worker 3 never joined scheduler 1"
        time.sleep(1)
    assert run(deployment.scheduler_addresses[1], prompts) == references
    busy = {s.labels["replica"] for s in samples(metrics, "sarathi_replica_iterations_total") if s.value > 0}
    assert len(busy) == 2, f"iterations ran on replicas {busy} only"


@needs_router
def test_stopping_one_scheduler_keeps_new_requests_succeeding_through_the_router(references, prompts,
                                                                                 deployment):
    deployment.schedulers[1].get_wrapped_container().stop(timeout=40)   # SIGTERM: it drains
    # Every round of new requests succeeds, right after the stop and once the router noticed.
    for _ in range(3):
        assert run(deployment.router_address, prompts[:8]) == references[:8]
        time.sleep(2)

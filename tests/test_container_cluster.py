"""A multi-host deployment as containers on a Docker network made here: a router, two schedulers
and three CPU workers (SmolLM2), each started with its Kubernetes manifest's command and
settings, under the names the cluster's DNS would give them. Clients on the host use ports
published on 127.0.0.1.

Workers join scheduler (ordinal mod 2): workers 0 and 2 serve scheduler 0, worker 1 scheduler 1.
The tests share the deployment and run in file order: killing and adding workers, then stopping
a scheduler.
"""

from __future__ import annotations

import importlib.util
import time
from concurrent.futures import ThreadPoolExecutor

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
HAS_ROUTER = importlib.util.find_spec("router_service") is not None
needs_router = pytest.mark.skipif(not HAS_ROUTER, reason="no router_service on this branch yet")


def worker(net: Network, ordinal: int):
    name = f"sarathi-worker-{ordinal}"
    return (from_pod_spec(WORKER_IMAGE, pod_spec("worker-cpu/worker.yaml"),
                          env={"POD_NAME": name, "SCHEDULERS": str(SCHEDULERS)})
            .with_network(net).with_network_aliases(f"{name}.sarathi-worker"))


class Deployment:
    def __init__(self, net: Network):
        self.net = net
        self.schedulers, self.scheduler_addresses = [], []
        for i in range(SCHEDULERS):
            # "sarathi-scheduler" on every scheduler: Docker's DNS answers it with all of them,
            # as the headless Service does.
            c, address = on_loopback(
                from_pod_spec(SCHEDULER_IMAGE, pod_spec("scheduler.yaml")).with_network(net)
                .with_network_aliases(f"sarathi-scheduler-{i}.sarathi-scheduler", "sarathi-scheduler"),
                50051)
            self.schedulers.append(c)
            self.scheduler_addresses.append(address)
        self.workers = {i: worker(net, i) for i in range(3)}
        self.router, self.router_address = (on_loopback(
            from_pod_spec(SCHEDULER_IMAGE, pod_spec("router.yaml", kind="Deployment")).with_network(net),
            50051)
            if HAS_ROUTER else (None, None))

    def containers(self):
        return [*self.schedulers, *self.workers.values(), *([self.router] if self.router else [])]

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


def run(address: str, prompts: list[list[int]], during=None) -> list[list[int]]:
    """Streams every prompt at once; `during()` runs once every stream has its first token."""
    import threading

    import grpc

    from protos import generation_pb2_grpc

    started = threading.Barrier(len(prompts) + 1, timeout=120)

    def one(prompt):
        def stream():
            first = True
            for msg in stub.Generate(greedy_request(prompt, NEW_TOKENS), timeout=180):
                if first:
                    started.wait()
                    first = False
                yield msg

        tokens, _, _ = collect(stream())
        return tokens

    with grpc.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        with ThreadPoolExecutor(len(prompts)) as pool:
            futures = [pool.submit(one, p) for p in prompts]
            started.wait()
            if during is not None:
                during()
            return [f.result() for f in futures]


@needs_router
def test_32_concurrent_greedy_requests_through_the_router_are_exact(deployment, prompts, references):
    assert run(deployment.router_address, prompts) == references


def test_a_worker_killed_mid_stream_loses_no_request(deployment, prompts, references):
    """Scheduler 0 has workers 0 and 2: `docker kill` of worker 0 while all 32 stream; its
    requests continue on worker 2 from the tokens already sent."""
    victim = deployment.workers.pop(0)
    got = run(deployment.scheduler_addresses[0], prompts,
              during=lambda: victim.get_wrapped_container().kill())
    assert got == references
    assert health(deployment.scheduler_addresses[0]) == "SERVING"


def test_a_new_worker_container_joins_and_takes_load(deployment, prompts, references):
    """Worker 3 joins scheduler 1 (3 mod 2); then scheduler 1's first worker stops: what it
    serves from then on, worker 3 serves."""
    deployment.workers[3] = newcomer = worker(deployment.net, 3)
    newcomer.start()
    deadline = time.monotonic() + 120
    while b"joined the scheduler" not in b"".join(newcomer.get_logs()):
        assert time.monotonic() < deadline, "worker 3 never joined"
        time.sleep(0.5)
    deployment.workers.pop(1).stop()   # SIGTERM: it drains, the scheduler moves its work
    assert run(deployment.scheduler_addresses[1], prompts[:8]) == references[:8]
    assert health(deployment.scheduler_addresses[1]) == "SERVING"


@needs_router
def test_stopping_one_scheduler_keeps_new_requests_succeeding_through_the_router(deployment, prompts,
                                                                                 references):
    deployment.schedulers[1].get_wrapped_container().stop(timeout=40)
    # Every round of new requests succeeds, right after the stop and once the router noticed.
    for _ in range(3):
        assert run(deployment.router_address, prompts[:8]) == references[:8]
        time.sleep(2)

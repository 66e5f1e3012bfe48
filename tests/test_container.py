"""The deploy/ image, run as a container: the single-container `serve` and the two-role split.

Opt-in: CI cannot afford to build the image, so these skip unless Docker is reachable and the
image named by SARATHI_IMAGE (default sarathi-serve:latest) exists. Build it with
deploy/build-image.sh, then (deploy/README.md):

    SARATHI_IMAGE=sarathi-serve:latest .venv/bin/pytest -q tests/test_container.py

Ports are published on 127.0.0.1 only; the split runs on a Docker network made by the test.
"""

from __future__ import annotations

import os
import socket
import time

import pytest

IMAGE = os.environ.get("SARATHI_IMAGE", "sarathi-serve:latest")
STARTUP_TIMEOUT_S = float(os.environ.get("SARATHI_CONTAINER_TIMEOUT", "300"))
QUESTION = "What is the capital of France?"

# Ryuk (testcontainers' reaper) is an image from a registry; the tests stop their own containers.
os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
testcontainers = pytest.importorskip(
    "testcontainers", reason="testcontainers is not installed (pip install -e '.[test]')")
from testcontainers.core.config import testcontainers_config  # noqa: E402
from testcontainers.core.container import DockerContainer  # noqa: E402
from testcontainers.core.network import Network  # noqa: E402

testcontainers_config.ryuk_disabled = True


@pytest.fixture(scope="module", autouse=True)
def image_present():
    try:
        import docker

        client = docker.from_env()
        client.ping()
    except Exception as e:  # no socket, no permission, daemon down
        pytest.skip(f"docker is not reachable ({type(e).__name__}: {e}); these tests need a daemon")
    try:
        client.images.get(IMAGE)
    except Exception:
        pytest.skip(f"image {IMAGE} not found: build it with deploy/build-image.sh "
                    "(or set SARATHI_IMAGE to an existing one)")
    finally:
        client.close()


def free_local_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_loopback(container: DockerContainer, container_port: int, host_port: int) -> DockerContainer:
    """Publishes the port on 127.0.0.1 only (with_bind_ports would take every interface):
    testcontainers hands `ports` to docker-py, which takes (host_ip, host_port) for a binding."""
    container.ports[f"{container_port}/tcp"] = ("127.0.0.1", host_port)
    return container


def logs(container: DockerContainer) -> str:
    out, err = container.get_logs()
    return (out + err).decode(errors="replace")[-4000:]


def wait_serving(address: str, containers: list[DockerContainer]) -> float:
    """Seconds until grpc health says SERVING; fails early if a container exits."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    start = time.monotonic()
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() - start < STARTUP_TIMEOUT_S:
            for c in containers:
                wrapped = c.get_wrapped_container()
                wrapped.reload()
                if wrapped.status != "running":
                    pytest.fail(f"container {wrapped.name} is {wrapped.status}:\n{logs(c)}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return time.monotonic() - start
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    pytest.fail(f"{address} not SERVING within {STARTUP_TIMEOUT_S:.0f} s:\n"
                + "\n".join(logs(c) for c in containers))


def ask(address: str) -> str:
    from sarathi.client import Client

    with Client(address) as client:
        answer = client.complete(messages=[{"role": "user", "content": QUESTION}], max_tokens=32,
                                 temperature=0.0)
    assert answer.time_to_first_token_s is not None, "no streamed chunk before the final message"
    assert answer.usage.completion_tokens > 0
    return answer.text


def test_single_container_serves_read_only():
    """`serve` in one container, as uid 65534 on a read-only root filesystem: the embedded model
    was converted at build time, so nothing is written to SARATHI_CACHE_DIR at start."""
    port = free_local_port()
    container = on_loopback(DockerContainer(IMAGE, read_only=True)
                            .with_tmpfs_mount("/tmp", "size=256m"), 50051, port)
    with container:
        ready = wait_serving(f"127.0.0.1:{port}", [container])
        answer = ask(f"127.0.0.1:{port}")
        uid = container.get_wrapped_container().exec_run(["id", "-u"]).output.decode().strip()
        log = logs(container)
    print(f"serve: SERVING {ready:.1f} s after start; answer: {answer!r}")
    assert "paris" in answer.lower(), answer
    assert uid == "65534"
    assert "converting" not in log, "the embedded model was converted at start, not at build time"


def test_scheduler_and_worker_containers_on_a_test_network():
    """The two roles as two containers on a network made here; the client talks to the
    scheduler's published port, the scheduler to the worker by its network alias."""
    port = free_local_port()
    with Network() as net:
        worker = (DockerContainer(IMAGE)
                  .with_command(["worker", "--host", "0.0.0.0", "--port", "50061"])
                  .with_network(net).with_network_aliases("worker"))
        scheduler = on_loopback(DockerContainer(IMAGE)
                                .with_command(["scheduler", "--host", "0.0.0.0", "--port", "50051",
                                               "--worker", "worker:50061"])
                                .with_network(net), 50051, port)
        with worker, scheduler:
            ready = wait_serving(f"127.0.0.1:{port}", [worker, scheduler])
            answer = ask(f"127.0.0.1:{port}")
    print(f"split: SERVING {ready:.1f} s after start; answer: {answer!r}")
    assert "paris" in answer.lower(), answer

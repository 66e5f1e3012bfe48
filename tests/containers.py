"""Helpers of the container tests (make test-containers): the images, containers started with
the Kubernetes pod specs' own settings, and waiting for gRPC health.

The tests need a Docker daemon and the images that deploy/build-image.sh builds. Where either is
missing they skip with the reason, unless SARATHI_REQUIRE_DOCKER=1 (make test-containers, CI):
then they fail, so that a run that tested nothing never looks green.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import yaml

SCHEDULER_IMAGE = os.environ.get("SARATHI_SCHEDULER_IMAGE", "sarathi-scheduler:latest")
WORKER_IMAGE = os.environ.get("SARATHI_WORKER_IMAGE", "sarathi-worker:latest")
STARTUP_TIMEOUT_S = float(os.environ.get("SARATHI_CONTAINER_TIMEOUT", "300"))
K8S = Path(__file__).resolve().parent.parent / "deploy" / "k8s"

# Ryuk (testcontainers' reaper) is an image from a registry; the tests remove their own containers.
os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
from testcontainers.core.config import testcontainers_config  # noqa: E402
from testcontainers.core.container import DockerContainer  # noqa: E402

testcontainers_config.ryuk_disabled = True


def unavailable(reason: str) -> None:
    if os.environ.get("SARATHI_REQUIRE_DOCKER") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def require_images(*images: str) -> None:
    try:
        import docker

        client = docker.from_env()
        client.ping()
    except Exception as e:  # no socket, no permission, daemon down
        unavailable(f"docker is not reachable ({type(e).__name__}: {e})")
    try:
        for image in images:
            try:
                client.images.get(image)
            except Exception:
                unavailable(f"image {image} not found: build it with deploy/build-image.sh")
    finally:
        client.close()


def free_local_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pod_spec(path: str, kind: str = "StatefulSet", patches: str | None = None) -> dict:
    """The pod template of the KIND in deploy/k8s/PATH; `patches`: a JSON 6902 patch file under
    deploy/k8s applied first (as an overlay's kustomization does)."""
    from kustomize import apply_patch_file

    for doc in yaml.safe_load_all((K8S / path).read_text()):
        if doc and doc["kind"] == kind:
            if patches:
                apply_patch_file(doc, K8S / patches)
            return doc["spec"]["template"]["spec"]
    raise AssertionError(f"no {kind} in {path}")


def docker_settings(pod: dict, container: dict, shared: dict[str, str], claims: dict[str, str]) -> dict:
    """docker run settings that impose what the pod spec imposes: its uid/gid, read-only root,
    capabilities dropped, no privilege escalation, default seccomp, each emptyDir a tmpfs of its
    sizeLimit writable by the pod's fsGroup (as Kubernetes makes it), or the Docker volume named
    in `shared` (an emptyDir that an init container fills); each claim the host path in `claims`."""
    pod_sc, sc = pod["securityContext"], container["securityContext"]
    assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault"   # Docker's default profile
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    tmpfs, binds = {}, []
    for mount in container.get("volumeMounts", []):
        v, path = volumes[mount["name"]], mount["mountPath"]
        mode = "ro" if mount.get("readOnly") else "rw"
        if "persistentVolumeClaim" in v:
            binds.append((claims[v["persistentVolumeClaim"]["claimName"]], path, mode))
        elif v["name"] in shared:
            binds.append((shared[v["name"]], path, mode))
        else:
            size = v["emptyDir"].get("sizeLimit", "1Gi").replace("Gi", "g").replace("Mi", "m")
            tmpfs[path] = f"size={size},uid={pod_sc['runAsUser']},gid={pod_sc['fsGroup']},mode=0770"
    return {"user": f"{pod_sc['runAsUser']}:{pod_sc['runAsGroup']}",
            "read_only": container["securityContext"]["readOnlyRootFilesystem"],
            "cap_drop": sc["capabilities"]["drop"],
            "security_opt": [] if sc["allowPrivilegeEscalation"] else ["no-new-privileges"],
            "tmpfs": tmpfs, "volumes": binds}


def from_pod_spec(image: str, pod: dict, env: dict[str, str] | None = None, init: bool = False,
                  shared: dict[str, str] | None = None,
                  claims: dict[str, str] | None = None) -> DockerContainer:
    """A container running what the pod's (first, or first init) container runs: its command,
    args, env and security settings (Kubernetes' $(VAR) expansion is not needed: the manifests
    use none)."""
    c = pod["initContainers" if init else "containers"][0]
    settings = docker_settings(pod, c, shared or {}, claims or {})
    tmpfs = settings.pop("tmpfs")
    container = DockerContainer(image, **settings)
    for path, options in tmpfs.items():
        container.with_tmpfs_mount(path, options)
    if "command" in c:
        container.with_kwargs(entrypoint=c["command"])
    container.with_command(list(c.get("args", [])))
    for e in c.get("env", []):
        if "value" in e:
            container.with_env(e["name"], e["value"])
    for k, v in (env or {}).items():
        container.with_env(k, v)
    return container


def on_loopback(container: DockerContainer, container_port: int) -> tuple[DockerContainer, str]:
    """Publishes the port on 127.0.0.1 only (with_bind_ports would take every interface)."""
    port = free_local_port()
    container.ports[f"{container_port}/tcp"] = ("127.0.0.1", port)
    return container, f"127.0.0.1:{port}"


def logs(container: DockerContainer) -> str:
    out, err = container.get_logs()
    return (out + err).decode(errors="replace")[-4000:]


def health(address: str, timeout: float = 2.0) -> str | None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                               timeout=timeout).status
        except grpc.RpcError:
            return None
    return health_pb2.HealthCheckResponse.ServingStatus.Name(status)


def wait_serving(address: str, containers: list[DockerContainer]) -> float:
    """Seconds until gRPC health says SERVING; fails at once if a container exits."""
    start = time.monotonic()
    while time.monotonic() - start < STARTUP_TIMEOUT_S:
        for c in containers:
            wrapped = c.get_wrapped_container()
            wrapped.reload()
            if wrapped.status != "running":
                pytest.fail(f"container {wrapped.name} is {wrapped.status}:\n{logs(c)}")
        if health(address) == "SERVING":
            return time.monotonic() - start
        time.sleep(0.5)
    pytest.fail(f"{address} not SERVING within {STARTUP_TIMEOUT_S:.0f} s:\n"
                + "\n".join(logs(c) for c in containers))

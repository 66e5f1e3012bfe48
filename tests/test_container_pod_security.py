"""The images under the Kubernetes pod specs' own settings (read-only root, uid 65534,
capabilities dropped, no privilege escalation, the emptyDirs as tmpfs): a scheduler and a worker
built from deploy/k8s/ reach SERVING and give exact greedy tokens, with the embedded model and
with a model of one's own (a GGUF mounted read-only, converted into the writable cache).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import collect, greedy_request, hf_greedy

pytestmark = pytest.mark.container

from containers import (  # noqa: E402
    SCHEDULER_IMAGE,
    WORKER_IMAGE,
    from_pod_spec,
    logs,
    on_loopback,
    pod_spec,
    require_images,
    wait_serving,
)
from testcontainers.core.network import Network  # noqa: E402

NEW_TOKENS = 16


@pytest.fixture(scope="module", autouse=True)
def images():
    require_images(SCHEDULER_IMAGE, WORKER_IMAGE)


@pytest.fixture(scope="module")
def prompts(long_token_ids) -> list[list[int]]:
    return [long_token_ids[11 * i: 11 * i + n] for i, n in enumerate([4, 19, 64, 150])]


@pytest.fixture(scope="module")
def references(hf_model, prompts) -> list[list[int]]:
    return [hf_greedy(hf_model, p, NEW_TOKENS) for p in prompts]


def greedy_tokens(address: str, prompts: list[list[int]]) -> list[list[int]]:
    import grpc

    from protos import generation_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        with ThreadPoolExecutor(len(prompts)) as pool:
            return [t for t, _, _ in pool.map(
                lambda p: collect(stub.Generate(greedy_request(p, NEW_TOKENS), timeout=120)), prompts)]


def scheduler_and_worker(net: Network, patched: bool = False, shared: dict[str, str] | None = None,
                         claims: dict[str, str] | None = None):
    """The manifests' scheduler-0 and worker-0 (one scheduler: SCHEDULERS=1) on `net` under their
    cluster DNS names, the scheduler's port published on loopback. `patched`: with the own-model
    overlay's patches (deploy/k8s/own-model)."""
    def patches(role: str) -> str | None:
        return f"own-model/{role}.patch.json" if patched else None

    scheduler_pod = pod_spec("scheduler.yaml", patches=patches("scheduler"))
    worker_pod = pod_spec("worker-cpu/worker.yaml", patches=patches("worker"))
    scheduler, address = on_loopback(
        from_pod_spec(SCHEDULER_IMAGE, scheduler_pod, shared=shared, claims=claims)
        .with_network(net).with_network_aliases("sarathi-scheduler-0.sarathi-scheduler"), 50051)
    worker = (from_pod_spec(WORKER_IMAGE, worker_pod, env={"POD_NAME": "sarathi-worker-0", "SCHEDULERS": "1"},
                            claims=claims)
              .with_network(net).with_network_aliases("sarathi-worker-0.sarathi-worker"))
    return scheduler, worker, address, scheduler_pod


def test_pod_spec_settings_serve_the_embedded_model_exactly(prompts, references):
    with Network() as net:
        scheduler, worker, address, _ = scheduler_and_worker(net)
        with worker, scheduler:
            ready = wait_serving(address, [scheduler, worker])
            got = greedy_tokens(address, prompts)
            uid = worker.get_wrapped_container().exec_run(["id", "-u"]).output.decode().strip()
            worker_log = logs(worker)
    print(f"embedded model under the pod spec: SERVING {ready:.1f} s after start")
    assert got == references
    assert uid == "65534"
    assert "converting" not in worker_log.lower(), "the image's converted model was not used"


def test_pod_spec_settings_serve_a_mounted_model_read_only_exactly(prompts, references, tmp_path):
    """The issue's PermissionError case, as the own-model overlay runs it: the GGUF mounted
    read-only at /models; the scheduler pod's init container (worker image) writes the tokenizer
    into its /cache, the torch-less scheduler reads it there; the worker converts the GGUF into
    its own /cache. The scheduler's /cache is a Docker named volume here (shared with the init
    container): it starts owned by uid 65534, as deploy/README.md's docker commands rely on."""
    import os
    import shutil

    import docker

    from sarathi_common.model_spec import embedded_gguf_path

    # The claim's content: the embedded GGUF under the name the overlay uses, readable by 65534.
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy2(embedded_gguf_path(), models / "model.gguf")
    for path, mode in ((tmp_path, 0o755), (models, 0o755), (models / "model.gguf", 0o644)):
        os.chmod(path, mode)
    claims = {"sarathi-models": str(models)}
    client = docker.from_env()
    volume = client.volumes.create()
    try:
        with Network() as net:
            scheduler, worker, address, scheduler_pod = scheduler_and_worker(
                net, patched=True, shared={"cache": volume.name}, claims=claims)
            init = from_pod_spec(WORKER_IMAGE, scheduler_pod, init=True, shared={"cache": volume.name},
                                 claims=claims)
            with init:
                status = init.get_wrapped_container().wait(timeout=300)
                assert status["StatusCode"] == 0, logs(init)
            with worker, scheduler:
                ready = wait_serving(address, [scheduler, worker])
                got = greedy_tokens(address, prompts)
                cached = worker.get_wrapped_container().exec_run(["ls", "-R", "/cache"]).output.decode()
                write = worker.get_wrapped_container().exec_run(["touch", "/models/x"]).exit_code
    finally:
        volume.remove(force=True)
        client.close()
    print(f"mounted model under the pod spec: SERVING {ready:.1f} s after start")
    assert got == references
    assert ".safetensors" in cached, f"the worker did not convert into /cache:\n{cached}"
    assert write != 0, "the model mount is writable"

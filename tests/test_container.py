"""The worker image's `serve` (scheduler + worker in one container), as deploy/README.md's first
command runs it: uid 65534, read-only root, port published on 127.0.0.1 only."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.container

from containers import WORKER_IMAGE, logs, on_loopback, require_images, wait_serving  # noqa: E402
from testcontainers.core.container import DockerContainer  # noqa: E402

QUESTION = "What is the capital of France?"


def test_serve_in_one_read_only_container_answers():
    """The embedded model was converted at build time, so nothing is written at start."""
    from sarathi.client import Client

    require_images(WORKER_IMAGE)
    container, address = on_loopback(DockerContainer(WORKER_IMAGE, read_only=True)
                                     .with_tmpfs_mount("/tmp", "size=256m"), 50051)
    with container:
        ready = wait_serving(address, [container])
        with Client(address) as client:
            answer = client.complete(messages=[{"role": "user", "content": QUESTION}], max_tokens=32,
                                     temperature=0.0)
        uid = container.get_wrapped_container().exec_run(["id", "-u"]).output.decode().strip()
        log = logs(container)
    print(f"serve: SERVING {ready:.1f} s after start; answer: {answer.text!r}")
    assert "paris" in answer.text.lower(), answer.text
    assert uid == "65534"
    assert "converting" not in log, "the embedded model was converted at start, not at build time"

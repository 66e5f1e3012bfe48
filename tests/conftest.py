"""Shared fixtures: real server processes on loopback, and Hugging Face reference generations."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from protos import generation_pb2, generation_pb2_grpc
from sarathi.client import wait_serving
from sarathi_common.lifecycle import popen_tied
from sarathi_common.net import free_port

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class RunningServer:
    address: str
    metrics_port: int
    proc: subprocess.Popen

    def stub(self) -> generation_pb2_grpc.GenerationStub:
        return generation_pb2_grpc.GenerationStub(grpc.insecure_channel(self.address))

    def operator(self) -> generation_pb2_grpc.OperatorStub:
        return generation_pb2_grpc.OperatorStub(grpc.insecure_channel(self.address))

    def metrics(self) -> dict[str, float]:
        """The server's Prometheus gauges and counters, by sample name (no labels)."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read()
        values = {}
        for line in text.decode().splitlines():
            if line and not line.startswith("#") and "{" not in line:
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def start_server(*args: str, timeout: float = 300) -> RunningServer:
    port, metrics_port = free_port(), free_port()
    # A small KV cache (about 5,800 tokens): enough for every test, and several servers fit in
    # the 24 GiB of a CI machine at once.
    cmd = [sys.executable, "-m", "sarathi.cli", "serve", "--port", str(port),
           "--metrics-port", str(metrics_port), "--threads", "2", "--cpu-cache-gib", "0.25", *args]
    # Its own process group (stop() signals it whole), and it dies with pytest even if pytest is
    # killed before teardown.
    proc = popen_tied(cmd, cwd=ROOT, start_new_session=True)
    server = RunningServer(f"127.0.0.1:{port}", metrics_port, proc)
    try:
        wait_serving(server.address, timeout, proc)
    except BaseException:
        server.stop()
        raise
    return server


@dataclass
class RunningGateway:
    """A `sarathi gateway` process: the OpenAI-compatible API at `base_url`."""

    port: int
    proc: subprocess.Popen

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Waits until `url` answers HTTP at all (any status)."""
    import urllib.error

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the process exited with code {proc.returncode} before answering {url}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


def start_gateway(upstream: str, *args: str, api_key: str | None = None,
                  timeout: float = 60) -> RunningGateway:
    """A gateway in front of `upstream`; its key (if any) comes from the environment."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "SARATHI_API_KEY"}
    if api_key is not None:
        env["SARATHI_API_KEY"] = api_key
    cmd = [sys.executable, "-m", "sarathi.cli", "gateway", "--upstream", upstream, "--port", str(port), *args]
    proc = popen_tied(cmd, cwd=ROOT, env=env)
    gateway = RunningGateway(port, proc)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout, proc)
    except BaseException:
        gateway.stop()
        raise
    return gateway


@pytest.fixture
def server_factory() -> Iterator:
    """Servers for one test, stopped when it ends (each holds a model and a KV cache)."""
    started: list[RunningServer] = []

    def factory(*args: str) -> RunningServer:
        server = start_server(*args)
        started.append(server)
        return server

    yield factory
    for s in started:
        s.stop()


@pytest.fixture(scope="session")
def default_server() -> Iterator[RunningServer]:
    """The embedded model with a small chunk size, shared by tests that only read from it."""
    server = start_server("--chunk-size", "64")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def small_cache_server() -> Iterator[RunningServer]:
    """48 blocks of 16 tokens: too small for the exactness prompts at once."""
    server = start_server("--chunk-size", "64", "--num-kv-blocks", "48")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def hf_model():
    """transformers' own Llama on the same converted weights: the reference for exactness."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sarathi_common.model_spec import resolve
    from worker_service.models.loader import hf_folder_for

    folder = str(hf_folder_for(resolve(None)))
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def hf_greedy(hf_model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy generate, one prompt at a time (no padding), never stopping at EOS.

    Results are cached on disk by weights, transformers version, prompt and length: the CPU
    reference takes about a minute for the exactness prompts, and it only changes with them."""
    import copy
    import hashlib
    import json

    import torch
    import transformers

    model, _ = hf_model
    key = hashlib.sha256(json.dumps([model.name_or_path, transformers.__version__, torch.__version__,
                                     prompt_ids, max_new_tokens]).encode()).hexdigest()[:24]
    from sarathi_common.model_spec import cache_root

    cached = cache_root() / "test-references" / f"{key}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id = None  # like ignore_eos: EOS is a token like any other
    config.do_sample, config.max_new_tokens, config.pad_token_id = False, max_new_tokens, 0
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    tokens = out[0, len(prompt_ids):].tolist()
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(tokens))
    return tokens


def greedy_request(prompt_ids: list[int], max_tokens: int) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(
        token_ids=generation_pb2.TokenIds(ids=prompt_ids),
        sampling=generation_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))


def collect(stream) -> tuple[list[int], str, generation_pb2.Finished]:
    tokens: list[int] = []
    text = ""
    finished = None
    for msg in stream:
        if msg.HasField("chunk"):
            tokens += msg.chunk.token_ids
            text += msg.chunk.text
        else:
            finished = msg.finished
            text += finished.text
    assert finished is not None, "the stream ended without a Finished message"
    return tokens, text, finished


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


LONG_TEXT = (
    "The history of computing is a story of ideas meeting machines. Early mechanical calculators "
    "gave way to electronic computers, which grew from rooms full of vacuum tubes to chips holding "
    "billions of transistors. Along the way, programmers invented languages, compilers, operating "
    "systems and networks, and each layer made the next one possible. Today large language models "
    "run on accelerators that multiply matrices faster than anyone imagined, and serving them well "
    "is an engineering problem of its own: batching requests, managing memory for attention caches, "
    "and keeping latency low for every user while the hardware stays busy. "
)


@pytest.fixture(scope="session")
def long_token_ids(hf_model) -> list[int]:
    _, tok = hf_model
    ids = tok.encode(LONG_TEXT * 8, add_special_tokens=False)
    assert len(ids) >= 700
    return ids


def serve_executor(executor, max_workers: int = 4) -> tuple[grpc.Server, int]:
    """The worker's real gRPC service, in this process, around `executor` (a test's stand-in for
    the model): returns the started server and its port."""
    from concurrent import futures

    from worker_service import server as server_module

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers))
    handlers = server_module.method_handlers(server_module.WorkerService(executor, 0, 1 << 20))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(server_module.SERVICE, handlers),))
    port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
    server.start()
    return server, port


def make_dev_certs(out: Path) -> Path:
    """deploy/dev-certs.sh's CA and certificates in `out`, and another CA's in `out/other`
    (signed, but not by this deployment: what a server must refuse)."""
    for folder in (out, out / "other"):
        subprocess.run([str(ROOT / "deploy" / "dev-certs.sh"), str(folder)], check=True,
                       capture_output=True)
    return out

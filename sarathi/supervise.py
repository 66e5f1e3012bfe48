"""Process supervision for the commands that run several processes: `serve` (a scheduler here,
its worker as a child, and with --http-port a gateway child) and `demo` (a whole `serve` in the
background, one question, stop)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from sarathi.children import Children, ChildSpec
from sarathi.client import Client, wait_serving
from sarathi_common.net import free_port
from sarathi_common.options import to_flags, without_option_variables
from scheduler_service.config import SchedulerConfig
from worker_service.config import HYBRID_GRAPH_TOKENS, WorkerConfig


def serve_worker_config(worker: WorkerConfig, scheduler: SchedulerConfig, port: int) -> WorkerConfig:
    """The worker `serve` starts: on loopback, with hybrid-iteration graphs no larger than the
    scheduler's budget ever forms (unless the user chose a size)."""
    graph_tokens = worker.hybrid_graph_tokens
    if graph_tokens is None:
        graph_tokens = min(scheduler.chunk_size, HYBRID_GRAPH_TOKENS)
    return dataclasses.replace(worker, host="127.0.0.1", port=port, hybrid_graph_tokens=graph_tokens)


def worker_command(worker: WorkerConfig) -> list[str]:
    """The worker process `serve` starts; a replica's rank 0 starts its other ranks itself."""
    return [sys.executable, "-m", "worker_service",
            *to_flags(worker, (*WorkerConfig.SHARED, *WorkerConfig.SECURITY, "host", "port"))]


def gateway_command(scheduler: SchedulerConfig, http_port: int) -> list[str]:
    """The gateway `serve --http-port` starts: on the scheduler's host, calling it on loopback
    when it listens on every address, or through the scheduler's local socket when it has one
    (an API on TLS: the gateway then needs neither the CA nor a client certificate). Its API
    key comes from the environment, never a flag."""
    upstream_host = "127.0.0.1" if scheduler.host in ("0.0.0.0", "", "::", "[::]") else scheduler.host
    upstream = f"unix:{scheduler.local_socket}" if scheduler.local_socket \
        else f"{upstream_host}:{scheduler.port}"
    return [sys.executable, "-m", "sarathi.gateway", "--upstream", upstream,
            "--host", scheduler.host, "--port", str(http_port)]


def with_gateway_socket(scheduler: SchedulerConfig,
                        http_port: int | None) -> tuple[SchedulerConfig, str | None]:
    """A scheduler whose API is on TLS gets a local socket for `serve`'s gateway, in a fresh
    folder only this user can open; -> (the scheduler's config, the folder to remove at exit)."""
    if http_port is None or not scheduler.tls_cert_file or scheduler.local_socket:
        return scheduler, None
    folder = tempfile.mkdtemp(prefix="sarathi-gateway-")
    return dataclasses.replace(scheduler, local_socket=os.path.join(folder, "api.sock")), folder


def child_environment() -> dict[str, str]:
    """This environment less the SARATHI_* settings meant for `serve` itself: its children get
    theirs as flags (a SARATHI_PORT for the scheduler must not move the worker or the gateway)."""
    return without_option_variables(os.environ, SchedulerConfig, WorkerConfig)


def replica_environments(worker: WorkerConfig, replicas: int) -> list[dict[str, str]]:
    """Each replica's environment: on GPUs, its own devices (CUDA_VISIBLE_DEVICES, cut from the
    one given to `serve`, or 0..n-1), world_size of them per replica."""
    base = child_environment()
    if replicas == 1 or worker.device == "cpu":
        return [base] * replicas
    world = worker.world_size
    visible = base.get("CUDA_VISIBLE_DEVICES") or ",".join(str(i) for i in range(replicas * world))
    devices = visible.split(",")
    if len(devices) < replicas * world:
        raise SystemExit(f"{replicas} replicas of {world} GPU(s) need {replicas * world} GPUs; "
                         f"CUDA_VISIBLE_DEVICES names {len(devices)}")
    return [{**base, "CUDA_VISIBLE_DEVICES": ",".join(devices[i * world:(i + 1) * world])}
            for i in range(replicas)]


def run_serve(scheduler: SchedulerConfig, worker: WorkerConfig, http_port: int | None = None,
              replicas: int = 1) -> None:
    """A scheduler (this process + its engine process), one worker subprocess per replica and,
    with an HTTP port, a gateway subprocess."""
    from scheduler_service.main import run_scheduler

    ports = [worker.port]
    while len(ports) < replicas:
        port = free_port()
        if port not in (*ports, scheduler.port):
            ports.append(port)
    workers = [dataclasses.replace(worker, port=port) for port in ports]
    scheduler, socket_folder = with_gateway_socket(scheduler, http_port)
    # One process per replica; a replica's rank 0 starts its other ranks (they die with it).
    specs = [ChildSpec(f"the worker of replica {i}" if replicas > 1 else "the worker",
                       worker_command(w), env, w.host, w.port)
             for i, (w, env) in enumerate(zip(workers, replica_environments(worker, replicas),
                                                strict=True), start=1)]
    if http_port is not None:
        gateway_host = "127.0.0.1" if scheduler.host in ("0.0.0.0", "", "::", "[::]") else scheduler.host
        specs.append(ChildSpec("the gateway", gateway_command(scheduler, http_port),
                               child_environment(), gateway_host, http_port))
    # Until the scheduler's own handlers are in place, SIGTERM (from a user, or from Children on
    # a child that cannot start) must still end serve through the cleanup below.
    signal.signal(signal.SIGTERM, _interrupt)
    children = Children(specs)
    # SIGTERM and SIGINT reach the scheduler's own handlers: it drains, then the children stop.
    try:
        run_scheduler(dataclasses.replace(scheduler, worker=",".join(f"{w.host}:{w.port}" for w in workers)))
    except KeyboardInterrupt:
        pass
    finally:
        # Stopping already: a later SIGTERM (say, from a child's watcher) must not cut the
        # cleanup short, now that the scheduler's handler is gone.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        children.stop()
        if socket_folder:
            shutil.rmtree(socket_folder, ignore_errors=True)
    if children.failure:
        raise SystemExit(children.failure)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_demo(prompt: str, max_tokens: int, model: str | None) -> None:
    """Starts `serve` in the background, asks one chat question, prints timings, stops."""
    port = free_port()
    start = time.monotonic()
    cmd = [sys.executable, "-m", "sarathi.cli", "serve", "--port", str(port)]
    if model:
        cmd += ["--model", model]
    server = subprocess.Popen(cmd, start_new_session=True)
    try:
        address = f"127.0.0.1:{port}"
        print(f"starting a scheduler and a worker (gRPC on {address}) ...", file=sys.stderr, flush=True)
        wait_serving(address, timeout=900, proc=server)
        ready = time.monotonic() - start
        print(f"> {prompt}", flush=True)
        from sarathi.console import stream_answer

        with Client(address) as client:
            completion, _ = stream_answer(client, messages=[{"role": "user", "content": prompt}],
                                          max_tokens=max_tokens, temperature=0.0)
        first = completion.time_to_first_token_s
        if first is not None:
            print(f"[serving after {ready:.1f} s; first token {first * 1000:.0f} ms after the request; "
                  f"{ready + first:.1f} s from start]", file=sys.stderr)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)

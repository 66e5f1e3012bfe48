"""Starts a local `sarathi serve` in its own process group, waits until it reports SERVING on
grpc.health.v1, and stops the whole group (scheduler, worker) afterwards.

Capacity search starts a fresh server per policy so that no policy inherits another's cache
state or warm-up.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sarathi_common.lifecycle import popen_tied
from sarathi_common.net import free_port

HEALTH_POLL_S = 0.5
STOP_GRACE_S = 15.0


@dataclass(frozen=True)
class ServerLaunch:
    policy: str | None = None
    chunk_size: int | None = None
    tbt_slo_ms: float | None = None  # sarathi's SLO-driven token budget
    model: str | None = None
    extra_args: tuple[str, ...] = ()  # passed to `sarathi serve` as they are
    startup_timeout_s: float = 300.0  # the first start converts the GGUF weights
    log_path: Path | None = None  # the server's stdout and stderr; a temporary file if None
    env: dict[str, str] = field(default_factory=dict)
    metrics: bool = True  # serve Prometheus /metrics on a port of its own, for the timeline

    def command(self, port: int, metrics_port: int | None = None) -> list[str]:
        args = [*sarathi_command(), "serve", "--port", str(port)]
        if metrics_port is not None:
            args += ["--metrics-port", str(metrics_port)]
        if self.policy is not None:
            args += ["--policy", self.policy]
        if self.chunk_size is not None:
            args += ["--chunk-size", str(self.chunk_size)]
        if self.tbt_slo_ms is not None:
            args += ["--tbt-slo-ms", f"{self.tbt_slo_ms:g}"]
        if self.model is not None:
            args += ["--model", self.model]
        return args + list(self.extra_args)


def sarathi_command() -> list[str]:
    """The console script beside this interpreter (the venv's), else the module."""
    script = Path(sys.executable).with_name("sarathi")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "sarathi.cli"]


class ServerStartError(RuntimeError):
    pass


def known_policies() -> set[str] | None:
    """The policies this checkout's scheduler has, or None if it cannot be imported here."""
    try:
        from scheduler_service.policies import POLICIES
    except ImportError:
        return None
    return set(POLICIES)


def check_policy(policy: str | None) -> None:
    """Fails at once for a policy the scheduler does not have, instead of waiting out the
    startup timeout on a server whose engine died."""
    known = known_policies()
    if policy is not None and known is not None and policy not in known:
        raise ServerStartError(f"unknown policy {policy!r} (this scheduler has {', '.join(sorted(known))})")


def wait_until_serving(address: str, timeout_s: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            if process is not None and process.poll() is not None:
                raise ServerStartError(f"the server exited with code {process.returncode} while starting")
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise ServerStartError(f"{address} did not report SERVING within {timeout_s:.0f} s")
            time.sleep(HEALTH_POLL_S)


class LocalServer:
    """`with LocalServer(launch) as server:` ... `server.address`."""

    def __init__(self, launch: ServerLaunch) -> None:
        self.launch = launch
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.metrics_port = free_port() if launch.metrics else None
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics" if self.metrics_port else None
        self.process: subprocess.Popen | None = None
        self.log_path = launch.log_path

    def __enter__(self) -> LocalServer:
        check_policy(self.launch.policy)
        if self.log_path is None:
            self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"sarathi-bench-server-{self.port}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        # popen_tied: it never outlives this process.
        self.process = popen_tied(
            self.launch.command(self.port, self.metrics_port),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **self.launch.env},
            start_new_session=True,  # its own process group, so stopping reaches the worker too
        )
        log.close()
        try:
            wait_until_serving(self.address, self.launch.startup_timeout_s, self.process)
        except BaseException as e:
            self.stop()
            if isinstance(e, ServerStartError):
                raise ServerStartError(f"{e}\n--- {self.log_path} (tail) ---\n{self.log_tail()}") from None
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def log_tail(self, num_chars: int = 4000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-num_chars:]

    def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        # Signals go to the group this server leads (pgid == its pid), nothing else.
        _signal_group(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            _signal_group(process.pid, signal.SIGKILL)
            process.wait(timeout=STOP_GRACE_S)
        # Children that outlive the leader (its worker, multiprocessing helpers) are still in its
        # group: give them the same grace to exit on their own, then kill what is left.
        if not wait_group_gone(process.pid, STOP_GRACE_S):
            _signal_group(process.pid, signal.SIGKILL)


def group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_group_gone(pgid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while group_exists(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass

"""`serve`'s children (a worker per replica, maybe a gateway), kept running: one that dies
after it was up is started again (the scheduler dials its worker back and the streams resume);
one that dies before it ever listened, on its first start or five times in a row, ends `serve`
with one line, since starting it again would only fail again (a bad flag, no GPU, no memory).
One that exits 0 was stopped on purpose (SIGTERM, or Ctrl-C reaching the whole group): serve
stops too."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass

from sarathi_common.lifecycle import popen_tied

log = logging.getLogger("sarathi.serve")

POLL_S = 0.2
MAX_QUICK_FAILURES = 5   # deaths in a row before listening, after which serve gives up
MAX_BACKOFF_S = 30.0


@dataclass
class ChildSpec:
    name: str                     # "the worker of replica 1": what a log line calls it
    command: list[str]
    env: dict[str, str]
    host: str
    port: int                     # it is up once this accepts a connection


@dataclass
class _Child:
    spec: ChildSpec
    proc: subprocess.Popen
    listened: bool = False
    starts: int = 1
    quick_failures: int = 0       # deaths before listening since it last listened
    restart_at: float | None = None


class Children:
    """Starts the children and watches them from a thread. On a fatal failure it records one
    line (`failure`) and sends this process SIGTERM, so the scheduler drains and returns."""

    def __init__(self, specs: list[ChildSpec]) -> None:
        self.failure: str | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._children = [_Child(spec, self._start(spec)) for spec in specs]
        self._thread = threading.Thread(target=self._watch, daemon=True, name="serve-children")
        self._thread.start()

    @property
    def processes(self) -> list[subprocess.Popen]:
        with self._lock:
            return [c.proc for c in self._children]

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stops watching, then the children: SIGTERM, and SIGKILL after timeout_s."""
        self._stopping.set()
        self._thread.join()
        procs = self.processes
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    @staticmethod
    def _start(spec: ChildSpec) -> subprocess.Popen:
        return popen_tied(spec.command, env=spec.env)

    def _watch(self) -> None:
        while not self._stopping.wait(POLL_S):
            for child in self._children:
                if self._check(child):
                    return

    def _check(self, child: _Child) -> bool:
        """One look at one child; True when serve must end."""
        spec, now = child.spec, time.monotonic()
        if child.restart_at is not None:
            if now >= child.restart_at:
                child.restart_at = None
                # From this thread: the kernel's parent-death signal follows the thread that
                # started a child, and this one lives until serve stops watching.
                with self._lock:
                    child.proc = self._start(spec)
                child.starts += 1
            return False
        code = child.proc.poll()
        if code is None:
            if not child.listened and _accepts(spec.host, spec.port):
                child.listened, child.quick_failures = True, 0
            return False
        if code == 0:
            log.info("%s stopped (exit code 0): serve stops too", spec.name)
            self._end(None)
            return True
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        if not child.listened:
            child.quick_failures += 1
            if child.starts == 1 or child.quick_failures >= MAX_QUICK_FAILURES:
                times = "" if child.starts == 1 else f" {child.quick_failures} times in a row"
                self._end(f"serve: {spec.name} {how} before it listened on {spec.host}:{spec.port}"
                           f"{times}; its output above says why")
                return True
        child.listened = False
        delay = min(MAX_BACKOFF_S, float(2 ** child.quick_failures) - 1)
        log.warning("%s %s; starting it again%s", spec.name, how, f" in {delay:g} s" if delay else "")
        child.restart_at = now + delay
        return False

    def _end(self, failure: str | None) -> None:
        self.failure = failure
        # The scheduler drains and run_scheduler returns. Unless serve is stopping already: then
        # the scheduler's handler may be gone, and SIGTERM would end serve before its cleanup.
        if not self._stopping.wait(0.5):
            os.kill(os.getpid(), signal.SIGTERM)


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False

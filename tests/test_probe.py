"""deploy/probe.py (`sarathi-probe` in the images), against a real `serve` whose API is on mutual
TLS with a local socket: liveness over TLS needs no certificates, readiness goes through the
socket, a plain probe on a TLS port fails, and a stopped process fails both within the timeout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, make_dev_certs, wait_for

from sarathi_common.lifecycle import popen_tied
from sarathi_common.net import free_port

pytestmark = pytest.mark.slow
PROBE = [sys.executable, str(ROOT / "deploy" / "probe.py")]


def probe(*args: str) -> int:
    env = {**os.environ, "SARATHI_PROBE_TIMEOUT": "2"}
    return subprocess.run([*PROBE, *args], env=env, capture_output=True, timeout=30).returncode


@pytest.fixture(scope="module")
def tls_serve(tmp_path_factory) -> Iterator[tuple[int, str, subprocess.Popen]]:
    certs = make_dev_certs(tmp_path_factory.mktemp("certs"))
    folder = tmp_path_factory.mktemp("sock")
    os.chmod(folder, 0o700)
    sock = str(folder / "api.sock")
    port = free_port()
    proc = popen_tied(
        [sys.executable, "-m", "sarathi.cli", "serve", "--port", str(port), "--threads", "2",
         "--cpu-cache-gib", "0.25", "--chunk-size", "64", "--local-socket", sock,
         "--tls-cert-file", str(certs / "server.pem"), "--tls-key-file", str(certs / "server.key"),
         "--tls-client-ca-file", str(certs / "ca.pem")],
        cwd=ROOT, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: proc.poll() is None and probe("--ready", "--socket", sock) == 0, 300,
                        interval=1), "not SERVING through the local socket"
        yield port, sock, proc
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def test_liveness_over_tls_needs_no_certificates(tls_serve):
    port, _, _ = tls_serve
    assert probe("--tls", str(port)) == 0


def test_a_plain_probe_on_a_tls_port_fails(tls_serve):
    port, _, _ = tls_serve
    assert probe(str(port)) == 1


def test_readiness_through_the_local_socket_is_serving(tls_serve):
    _, sock, _ = tls_serve
    assert probe("--ready", "--socket", sock) == 0
    assert probe("--socket", sock) == 0


def test_a_stopped_process_fails_both_probes_and_passes_again_once_resumed(tls_serve):
    port, sock, proc = tls_serve
    os.killpg(proc.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        assert probe("--tls", str(port)) == 1
        assert probe("--ready", "--socket", sock) == 1
        assert time.monotonic() - start < 15
    finally:
        os.killpg(proc.pid, signal.SIGCONT)
    assert wait_for(lambda: probe("--tls", str(port)) == 0 and probe("--ready", "--socket", sock) == 0, 30)


def test_a_closed_port_fails_liveness():
    port = free_port()
    assert probe("--tls", str(port)) == 1
    assert probe(str(port)) == 1
    assert probe("--socket", str(Path("/nonexistent") / "api.sock")) == 1

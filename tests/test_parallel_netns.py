"""A replica whose workers live in separate network namespaces (as on separate hosts, joined by
a veth link) still samples exactly the tokens of one worker. Needs root for `ip netns`."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from contextlib import contextmanager

import pytest
from conftest import ROOT, RunningServer, start_server
from test_parallel_exactness import generate_all
from test_services import kill

from sarathi.client import wait_serving
from sarathi_common.net import free_port

TINY = ("--model", "dummy:tiny", "--weights-seed", "7", "--threads", "1")
PROMPT_LENGTHS = [5, 12, 33, 70, 128, 201, 333, 600]


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


@contextmanager
def two_hosts():
    """Namespaces A and B on one link (10.213.N.1 and .2), and the test's own namespace on a
    second link to A (10.214.N.1 here, .2 in A) so that the scheduler can reach rank 0."""
    n = os.getpid() % 250
    a, b = f"sarathi-a{os.getpid()}", f"sarathi-b{os.getpid()}"
    links = [f"sva{n}", f"svb{n}", f"svr{n}", f"sve{n}"]
    try:
        sh("ip", "netns", "add", a)
    except (subprocess.CalledProcessError, FileNotFoundError, PermissionError):
        pytest.skip("cannot create network namespaces here (needs root and iproute2)")
    try:
        sh("ip", "netns", "add", b)
        sh("ip", "link", "add", links[0], "type", "veth", "peer", "name", links[1])
        sh("ip", "link", "set", links[0], "netns", a)
        sh("ip", "link", "set", links[1], "netns", b)
        sh("ip", "link", "add", links[2], "type", "veth", "peer", "name", links[3])
        sh("ip", "link", "set", links[3], "netns", a)
        sh("ip", "addr", "add", f"10.214.{n}.1/24", "dev", links[2])
        sh("ip", "link", "set", links[2], "up")
        for ns, dev, addr in ((a, links[0], f"10.213.{n}.1/24"), (b, links[1], f"10.213.{n}.2/24"),
                              (a, links[3], f"10.214.{n}.2/24")):
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", addr, "dev", dev)
            sh("ip", "netns", "exec", ns, "ip", "link", "set", dev, "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield dict(a=a, b=b, a_ip=f"10.213.{n}.1", b_ip=f"10.213.{n}.2", a_if=links[0], b_if=links[1],
                   a_from_here=f"10.214.{n}.2")
    finally:
        subprocess.run(["ip", "link", "del", links[2]], capture_output=True)
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def spawn_in(ns: str, ifname: str, *args: str) -> subprocess.Popen:
    # gloo picks its interface by name; ZeroMQ and gRPC bind all interfaces of the namespace.
    env = dict(os.environ, GLOO_SOCKET_IFNAME=ifname)
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "sarathi.cli", *args],
                            cwd=ROOT, env=env, start_new_session=True)


@pytest.mark.slow   # tests/test_parallel_exactness.py has the same layouts on loopback in `make test`
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_workers_in_separate_network_namespaces_give_exact_tokens(tp, pp):
    rng = random.Random(0)
    prompts = [[rng.randrange(1, 512) for _ in range(n)] for n in PROMPT_LENGTHS]
    with two_hosts() as net:
        grpc_port, sched_port = free_port(), free_port()
        layout = ["--tensor-parallel-size", str(tp), "--pipeline-parallel-size", str(pp),
                  "--replica-addresses", f"{net['a_ip']}:{free_port()},{net['b_ip']}:{free_port()}",
                  "--dist-init", f"{net['a_ip']}:{free_port()}"]
        procs = [spawn_in(net["a"], net["a_if"], "worker", "--host", "0.0.0.0", "--port", str(grpc_port),
                          "--rank", "0", *TINY, *layout),
                 spawn_in(net["b"], net["b_if"], "worker", "--rank", "1", *TINY, *layout)]
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "sarathi.cli", "scheduler", "--port", str(sched_port),
             "--worker", f"{net['a_from_here']}:{grpc_port}", "--model", "dummy:tiny", "--chunk-size", "64"],
            cwd=ROOT, start_new_session=True))
        try:
            scheduler = RunningServer(f"127.0.0.1:{sched_port}", 0, procs[-1])
            wait_serving(scheduler.address, timeout=180)
            got = generate_all(scheduler, prompts, 16)
        finally:
            for p in procs:
                kill(p, signal.SIGKILL)
    reference = start_server("--model", "dummy:tiny", "--weights-seed", "7", "--chunk-size", "64",
                             "--threads", "1", timeout=240)
    try:
        expected = generate_all(reference, prompts, 16)
    finally:
        reference.stop()
    assert got == expected

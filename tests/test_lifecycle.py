"""A child started with popen_tied is the command itself (same pid: signals and waits reach it)
and gets SIGTERM when the process that started it dies, even by kill -9."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import psutil
from conftest import ROOT

PARENT = """
import sys, time
from sarathi_common.lifecycle import popen_tied
child = popen_tied(["sleep", "60"])
print(child.pid, flush=True)
time.sleep(60)
"""


def test_a_tied_child_is_the_command_and_dies_with_its_parent_killed_by_sigkill():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        child = psutil.Process(int(parent.stdout.readline()))
        deadline = time.monotonic() + 10
        while child.cmdline()[:1] != ["sleep"]:   # the short-lived Python execs the command
            assert time.monotonic() < deadline, child.cmdline()
            time.sleep(0.05)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        child.wait(10)   # raises TimeoutExpired if it outlived its parent
    finally:
        parent.kill()

"""Child processes that never outlive the process that started them, and a process that ends
at once.

A `serve` killed with SIGKILL cannot stop its worker or engine; the kernel can, if each child
asks to be sent SIGTERM when its parent dies (Linux prctl PR_SET_PDEATHSIG). Elsewhere a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import signal
import subprocess
import sys

_PR_SET_PDEATHSIG = 1


def exit_with_parent(parent_pid: int, signum: int = signal.SIGTERM) -> None:
    """Call in the child: `signum` arrives when parent_pid (the process that started it) dies.
    The parent's pid is passed in rather than compared with 1, since in a container the parent
    may well be process 1."""
    if not sys.platform.startswith("linux"):
        return
    _libc().prctl(_PR_SET_PDEATHSIG, signum)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os.kill(os.getpid(), signum)


@functools.cache
def _libc() -> ctypes.CDLL:
    # find_library runs ldconfig in a subprocess: never call it first in a forked child.
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def tied_to_this_process(command: list[str]) -> list[str]:
    """`command`, run so that it gets SIGTERM when this process (strictly: the calling thread)
    dies: a short-lived Python asks for that (prctl), then execs `command`, keeping its pid.
    Not a Popen preexec_fn: that makes Popen fork() rather than vfork(), and fork() runs gRPC's
    fork handlers, which were seen to hang for good with gRPC threads busy in this process."""
    if not sys.platform.startswith("linux"):
        return command
    return [sys.executable, "-m", "sarathi_common.tied", str(os.getpid()), *command]


def popen_tied(command: list[str], **kwargs) -> subprocess.Popen:
    """subprocess.Popen of `command`, tied to this process (see tied_to_this_process)."""
    return subprocess.Popen(tied_to_this_process(command), **kwargs)


def exit_now(code: int) -> None:
    """Ends the process without waiting for threads or a collective group's teardown (which may
    hang on a dead peer)."""
    logging.shutdown()
    os._exit(code)


def release_freed_memory() -> None:
    """Gives the heap's free pages back to the system (glibc malloc_trim). After a message of
    many megabytes, gRPC's freed buffers otherwise keep the process's RSS up for good."""
    if sys.platform.startswith("linux"):
        try:
            _libc().malloc_trim(0)
        except AttributeError:   # a libc without malloc_trim (musl)
            pass

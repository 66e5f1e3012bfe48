"""Child processes that never outlive the process that started them.

A `serve` killed with SIGKILL cannot stop its worker or engine; the kernel can, if each child
asks to be sent SIGTERM when its parent dies (Linux prctl PR_SET_PDEATHSIG). Elsewhere a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def exit_with_parent() -> None:
    """Call in the child (or as Popen's preexec_fn): SIGTERM arrives when the parent dies."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() == 1:  # the parent already died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)

"""The private folder that holds the frontend's and the engine's ZeroMQ sockets.

Filesystem sockets in a folder only this user can open (mkdtemp makes it 0700) keep other local
users off the engine's command socket, which abstract sockets would not. The folder is named
after the frontend's pid so that one left by a killed scheduler can be told apart and removed:
the engine removes it when it outlives its frontend, and every start sweeps those whose
frontend is gone.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

PREFIX = "sarathi-"
_NAME = re.compile(rf"^{PREFIX}(\d+)-")


def make_ipc_dir() -> str:
    sweep_stale()
    return tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-")


def ipc_dir_of(address: str) -> str | None:
    """The folder of an `ipc://` address made here, or None."""
    if not address.startswith("ipc://"):
        return None
    folder = os.path.dirname(address[len("ipc://"):])
    return folder if _NAME.match(os.path.basename(folder)) else None


def remove_ipc_dir(folder: str | None) -> None:
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's process: alive
        return True
    return True


def sweep_stale(root: str | None = None) -> list[str]:
    """Removes this user's socket folders whose frontend process is gone; returns them."""
    removed = []
    for entry in Path(root or tempfile.gettempdir()).glob(f"{PREFIX}*"):
        match = _NAME.match(entry.name)
        try:
            mine = entry.is_dir() and entry.stat().st_uid == os.getuid()
        except OSError:
            continue
        if match and mine and not _alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(str(entry))
    return removed

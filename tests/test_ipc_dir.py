"""The scheduler's socket folder (sarathi-PID-*) never outlives it: removed on a clean stop, by
the engine when the frontend is killed, and by the next start when both were."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import start_server, wait_for

from scheduler_service.ipc_dir import make_ipc_dir, sweep_stale


def socket_folders(root: Path) -> list[Path]:
    return sorted(root.glob("sarathi-*"))


def test_a_start_sweeps_folders_whose_scheduler_is_gone(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)   # read TMPDIR again
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f"sarathi-{dead.pid}-abc").mkdir()
    (tmp_path / f"sarathi-{os.getppid()}-def").mkdir()   # alive: kept
    (tmp_path / "sarathi-unrelated").mkdir()              # not ours by name: kept
    mine = make_ipc_dir()
    assert sorted(p.name for p in socket_folders(tmp_path)) == sorted(
        [f"sarathi-{os.getppid()}-def", "sarathi-unrelated", Path(mine).name])
    assert sweep_stale(str(tmp_path)) == []


@pytest.mark.slow   # about 30-50 s: make test stays under 15 minutes on 2 cores
def test_no_socket_folder_remains_after_a_clean_stop_or_a_kill(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    server = start_server("--chunk-size", "64")
    assert len(socket_folders(tmp_path)) == 1
    server.stop()                      # SIGTERM: drains and removes it
    assert socket_folders(tmp_path) == []

    server = start_server("--chunk-size", "64")
    [folder] = socket_folders(tmp_path)
    assert folder.name.startswith(f"sarathi-{server.proc.pid}-")
    os.kill(server.proc.pid, signal.SIGKILL)   # the frontend only: its engine outlives it briefly
    server.proc.wait(10)
    assert wait_for(lambda: not folder.exists(), timeout=30)
    server.stop()

"""A GGUF file is dequantised once into the cache, also when several processes (the ranks of a
replica) start on it at the same moment: one converts, the others wait for it and load its result."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONVERT = ("from sarathi_common.model_spec import resolve; "
           "from worker_service.models.loader import hf_folder_for; "
           "print('folder', hf_folder_for(resolve(None)))")


@pytest.mark.slow   # about 30-50 s: make test stays under 15 minutes on 2 cores
def test_processes_starting_together_convert_the_gguf_once(tmp_path):
    env = dict(os.environ, SARATHI_CACHE_DIR=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", CONVERT], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(3)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sum(out.count("converting ") for out in outs) == 1, outs
    folders = {line.split(" ", 1)[1] for out in outs for line in out.splitlines()
               if line.startswith("folder ")}
    assert len(folders) == 1
    folder = Path(folders.pop())
    assert (folder / "config.json").exists() and (folder / "model.safetensors").exists()
    assert [p.name for p in tmp_path.glob("converted/.tmp-*")] == []  # no half-written copies left

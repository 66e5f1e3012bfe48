"""GPU tests: skipped cleanly without CUDA (CI); run on the device by tests/gpu/run_on_device.sh."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    collect_ignore_glob = ["test_*.py"]


_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items) -> None:
    # This hook sees the whole session's items: mark only the ones in this folder.
    for item in items:
        if _HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.gpu)

"""GPU tests: skipped cleanly without CUDA (CI); run on the device by tests/gpu/run_on_device.sh."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    collect_ignore_glob = ["test_*.py"]


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        item.add_marker(pytest.mark.gpu)

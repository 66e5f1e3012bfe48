"""The import layers hold (.importlinter), and breaking one fails the check: an `import torch` in
the scheduler or the gateway, or a kernel importing the worker."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("sarathi", "sarathi_common", "scheduler_service", "worker_service", "kernels", "protos",
            "benchmarks")


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"}
    return subprocess.run([str(Path(sys.executable).parent / "lint-imports")], cwd=cwd,
                          capture_output=True, text=True, env=env)


@pytest.fixture
def copy_of_the_code(tmp_path) -> Path:
    for name in PACKAGES:
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", tmp_path)
    return tmp_path


def test_the_layer_contracts_hold():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout


def test_the_copy_the_other_tests_break_holds_too(copy_of_the_code):
    result = lint_imports(copy_of_the_code)
    assert result.returncode == 0, result.stdout


def test_a_torch_import_in_the_scheduler_breaks_a_contract(copy_of_the_code):
    engine = copy_of_the_code / "scheduler_service" / "engine.py"
    engine.write_text(engine.read_text() + "\nimport torch  # noqa\n")
    result = lint_imports(copy_of_the_code)
    assert result.returncode != 0
    assert "scheduler_service imports no torch and no worker_service BROKEN" in result.stdout


def test_a_kernel_importing_the_worker_breaks_a_contract(copy_of_the_code):
    kernel = copy_of_the_code / "kernels" / "norm.py"
    kernel.write_text(kernel.read_text() + "\nimport worker_service.runner  # noqa\n")
    result = lint_imports(copy_of_the_code)
    assert result.returncode != 0
    assert "kernels import nothing of the services BROKEN" in result.stdout


def test_a_torch_import_in_the_gateway_breaks_a_contract(copy_of_the_code):
    app = copy_of_the_code / "sarathi" / "gateway" / "app.py"
    app.write_text(app.read_text() + "\nimport torch  # noqa\n")
    result = lint_imports(copy_of_the_code)
    assert result.returncode != 0
    assert "sarathi.gateway is not allowed to import torch" in result.stdout


def test_importing_the_cli_module_breaks_a_contract(copy_of_the_code):
    client = copy_of_the_code / "sarathi" / "client" / "__init__.py"
    client.write_text(client.read_text() + "\nimport sarathi.cli  # noqa\n")
    result = lint_imports(copy_of_the_code)
    assert result.returncode != 0
    assert "nothing imports the CLI module BROKEN" in result.stdout

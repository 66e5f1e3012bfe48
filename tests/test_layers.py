"""The import layers hold (.importlinter), and breaking one fails the check: an `import torch` in
the scheduler or the gateway, or a kernel importing the worker. And no top-level package of ours
shares its import name with an installed distribution (transformers 5.25 began to require
Hugging Face's `kernels`, which our old `kernels/` shadowed: `import transformers` failed)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("sarathi", "sarathi_common", "scheduler_service", "router_service", "worker_service",
            "sarathi_kernels", "protos", "benchmarks")


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


def test_no_package_of_ours_shares_its_import_name_with_an_installed_distribution():
    ours = importlib.metadata.metadata("sarathi-serve")["Name"]
    providers = importlib.metadata.packages_distributions()
    clashes = {name: others for name in PACKAGES
               if (others := sorted(set(providers.get(name, ())) - {ours}))}
    assert not clashes, f"rename these packages of ours; installed distributions own the names: {clashes}"


def test_each_package_of_ours_imports_from_this_checkout():
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin is not None, name
        assert Path(spec.origin).resolve().is_relative_to(ROOT), f"{name} imports from {spec.origin}"


def test_the_layer_contracts_hold():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout


def test_the_copy_the_other_tests_break_holds_too(copy_of_the_code):
    result = lint_imports(copy_of_the_code)
    assert result.returncode == 0, result.stdout


# (file in the copy, the import added to it, what lint-imports must report)
BREAKS = {
    "a torch import in the scheduler": ("scheduler_service/engine.py", "import torch",
                                        "scheduler_service imports no torch and no worker_service BROKEN"),
    "a torch import in the router": ("router_service/pool.py", "import torch",
                                     "router_service imports no torch and no service BROKEN"),
    "a kernel importing the worker": ("sarathi_kernels/norm.py", "import worker_service.runner",
                                      "kernels import nothing of the services BROKEN"),
    "a torch import in the gateway": ("sarathi/gateway/app.py", "import torch",
                                      "sarathi.gateway is not allowed to import torch"),
    "importing the CLI module": ("sarathi/client/__init__.py", "import sarathi.cli",
                                 "nothing imports the CLI module BROKEN"),
}


@pytest.mark.parametrize("path,line,report", BREAKS.values(), ids=BREAKS.keys())
def test_breaking_a_layer_fails_the_contracts(copy_of_the_code, path, line, report):
    module = copy_of_the_code / path
    module.write_text(module.read_text() + f"\n{line}  # noqa\n")
    result = lint_imports(copy_of_the_code)
    assert result.returncode != 0
    assert report in result.stdout

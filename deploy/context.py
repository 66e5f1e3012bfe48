"""The Docker build context for deploy/Dockerfile, as a tar on stdout, or its inputs' hash.

    python3 deploy/context.py [--hash EXTRA] WHEEL_DIR...

The context holds only what the images need: src/ (the tracked sources of the packages, never
.venv, caches or generated stubs), wheels/NAME for each deploy/wheels/NAME given, and
requirements/{base,worker,constraints}.txt: pyproject's dependencies and worker extra alone, and
the pins, so that the image's dependency layers are rebuilt when those change, not at every edit
of pyproject.toml. --hash prints a digest of everything that would go in (file contents; wheels
by name and size) plus EXTRA (the base image's id, the target...), so that build-image.sh can
skip a build whose inputs are unchanged (CI on the same machine).
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tarfile
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["pyproject.toml", "constraints.txt", "README.md", "protos", "sarathi", "sarathi_common",
           "scheduler_service", "worker_service", "router_service", "sarathi_kernels", "benchmarks",
           "deploy/probe.py"]


def source_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "--", *SOURCES], cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout.split("\n")
    return sorted(p for p in out if p and "__pycache__" not in p and "_pb2" not in p
                  and (ROOT / p).is_file())


def requirements() -> dict[str, bytes]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {"requirements/base.txt": "\n".join(project["dependencies"]).encode() + b"\n",
            "requirements/worker.txt": "\n".join(project["optional-dependencies"]["worker"]).encode() + b"\n",
            "requirements/constraints.txt": (ROOT / "constraints.txt").read_bytes()}


def members(wheel_dirs: list[str]) -> list[tuple[Path, str]]:
    """(file, name in the context), in a stable order."""
    # The Dockerfile first and GNU headers: with PAX headers and the Dockerfile later in the
    # stream, the daemon (20.10) took another file of the stream for the Dockerfile.
    found = [(ROOT / "deploy/Dockerfile", "Dockerfile")]
    found += [(ROOT / p, f"src/{p}") for p in source_files()]
    for d in wheel_dirs:
        folder = ROOT / "deploy/wheels" / d
        if not folder.is_dir():
            sys.exit(f"context.py: {folder} is missing (build-image.sh downloads it)")
        found += [(f, f"wheels/{d}/{f.name}") for f in sorted(folder.iterdir()) if f.suffix == ".whl"]
    return found


def digest(wheel_dirs: list[str], extra: str) -> str:
    h = hashlib.sha256(extra.encode())
    for path, name in members(wheel_dirs):
        h.update(name.encode() + b"\0")
        # Wheels are named by version and never rewritten in place: name and size suffice.
        h.update(str(path.stat().st_size).encode() if name.startswith("wheels/") else path.read_bytes())
    return h.hexdigest()[:16]   # (requirements/ derive from pyproject.toml and constraints.txt, hashed above)


def write_tar(wheel_dirs: list[str]) -> None:
    with tarfile.open(fileobj=sys.stdout.buffer, mode="w|", format=tarfile.GNU_FORMAT) as tar:
        for path, name in members(wheel_dirs):
            tar.add(path, arcname=name, recursive=False)
        for name, data in requirements().items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))


def main(argv: list[str]) -> None:
    if argv[:1] == ["--hash"]:
        print(digest(argv[2:], argv[1]))
    else:
        write_tar(argv)


if __name__ == "__main__":
    main(sys.argv[1:])

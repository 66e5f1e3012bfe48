"""Generates the Python stubs for the .proto files beside this module with grpcio-tools.

`python -m protos.generate` writes them next to the protos (git-ignored); `--check` regenerates
into a scratch folder and fails if the stubs in place differ, so hand edits are caught.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

PROTO_DIR = Path(__file__).resolve().parent
ROOT = PROTO_DIR.parent
PROTO_FILES = sorted(p.name for p in PROTO_DIR.glob("*.proto"))


def generated_names() -> list[str]:
    names = []
    for proto in PROTO_FILES:
        stem = proto.removesuffix(".proto")
        names += [f"{stem}_pb2.py", f"{stem}_pb2_grpc.py", f"{stem}_pb2.pyi"]
    return names


def generate(out_root: Path) -> None:
    """Writes stubs under out_root/protos/ so that they import each other as `protos.x_pb2`."""
    grpc_include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{ROOT}",
        f"-I{grpc_include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *[str(PROTO_DIR / p) for p in PROTO_FILES],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed; see the message above")


def check() -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = [
            n
            for n in generated_names()
            if not (PROTO_DIR / n).exists()
            or not filecmp.cmp(Path(tmp) / "protos" / n, PROTO_DIR / n, shallow=False)
        ]
    for name in stale:
        print(f"stale or hand-edited stub: protos/{name}; run `python -m protos.generate`")
    return not stale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="verify, do not write")
    if parser.parse_args().check:
        sys.exit(0 if check() else 1)
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        for name in generated_names():
            shutil.copyfile(Path(tmp) / "protos" / name, PROTO_DIR / name)
    print(f"generated {len(generated_names())} stub files in {PROTO_DIR}")


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with every wheel a GPU host without network lacks, for
# benchmarks/device/gpu_session.sh, which installs them there: FlashInfer, tvm-ffi, pyzmq and gguf
# (from ../shared/device/fetch-wheels, a script beside this checkout, unless .whl/ already holds a
# FlashInfer wheel), then the small pure-Python ones the serving benchmark imports, pinned to the
# GPU host's grpcio (1.84.0: stubs made by a newer grpcio-tools refuse to load there, so
# gpu_session.sh regenerates them on the host). For CPython 3.12 on x86-64 Linux.
# Run from the repo root on a machine with PyPI access:
#   bash benchmarks/device/fetch_device_wheels.sh
set -euo pipefail
[ -n "$(ls .whl/flashinfer_python-*.whl 2>/dev/null)" ] || ../shared/device/fetch-wheels
python3 -m pip download -q --no-deps --only-binary=:all: --dest .whl \
    --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    rich markdown-it-py mdurl pygments prometheus-client msgspec pyyaml \
    "grpcio-health-checking==1.84.0" "grpcio-reflection==1.84.0" "grpcio-tools==1.84.0"
ls .whl

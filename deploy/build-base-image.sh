#!/usr/bin/env bash
# Builds the base image from Debian packages with debootstrap and imports it into Docker as
# sarathi-base:bookworm (no registry needed). Run as root; takes a few minutes.
set -euo pipefail
tag=${1:-sarathi-base:bookworm}
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
command -v debootstrap >/dev/null || apt-get install -y -q debootstrap
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates bookworm "$root"
tar -C "$root" -c . | docker import - "$tag"
echo "built $tag"

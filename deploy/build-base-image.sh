#!/usr/bin/env bash
# Builds the base image from Debian packages with debootstrap and imports it into Docker as
# sarathi-base:bookworm (no registry needed): a minimal bookworm with python3 (3.11), venv and tini,
# security updates applied, apt lists and caches dropped. Run as root; takes a few minutes.
#   deploy/build-base-image.sh [TAG]       MIRROR=http://deb.debian.org/debian by default
set -euo pipefail
tag=${1:-sarathi-base:bookworm}
mirror=${MIRROR:-http://deb.debian.org/debian}
security=${SECURITY_MIRROR:-http://deb.debian.org/debian-security}
[ "$(id -u)" = 0 ] || { echo "run as root (debootstrap needs it)" >&2; exit 1; }
command -v debootstrap >/dev/null || { apt-get update -q && apt-get install -y -q debootstrap; }
root=$(mktemp -d /var/tmp/sarathi-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
# python3-venv brings ensurepip (so pip inside the venv); python3-pip itself is not needed.
# tini is PID 1 in the container: sarathi's children must not have PID 1 as their parent
# (sarathi/lifecycle.py takes a parent PID of 1 for "my parent died" and exits at once).
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,tini bookworm "$root" "$mirror"
cat > "$root/etc/apt/sources.list" <<EOF
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb $security bookworm-security main
EOF
chroot "$root" /bin/sh -ec 'export DEBIAN_FRONTEND=noninteractive
  apt-get update -q && apt-get upgrade -y -q && apt-get clean
  rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt/* /var/log/dpkg.log'
rm -rf "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/tmp/* \
    "$root"/var/tmp/*
tar --numeric-owner -C "$root" -c . \
    | docker import -c 'ENV LANG=C.UTF-8' -c 'CMD ["/bin/bash"]' - "$tag"
echo "built $tag ($(docker image inspect -f '{{.Size}}' "$tag" | numfmt --to=iec) uncompressed)"

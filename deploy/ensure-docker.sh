#!/usr/bin/env bash
# Makes a Docker daemon reachable for the container tests (.ci/run): installs docker.io with apt
# where dockerd is missing, starts it in the background where none runs, waits for it.
# Exits 0 when `docker info` answers; otherwise prints ONE line saying why and exits 1.
set -uo pipefail
log=${DOCKERD_LOG:-/var/log/dockerd.log}
why() { echo "container tests NOT RUN: Docker cannot start here: $*"; exit 1; }

docker info >/dev/null 2>&1 && exit 0
if ! command -v dockerd >/dev/null; then
  [ "$(id -u)" = 0 ] || why "dockerd is not installed and installing it needs root"
  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io; } \
      >/tmp/docker-install.log 2>&1 || why "apt-get install docker.io failed (see /tmp/docker-install.log)"
fi
[ "$(id -u)" = 0 ] || why "no daemon answers and starting dockerd needs root"
nohup dockerd >"$log" 2>&1 &
for _ in $(seq 60); do
  docker info >/dev/null 2>&1 && exit 0
  kill -0 $! 2>/dev/null || break
  sleep 1
done
why "dockerd did not come up: $(grep -iE 'error|fail' "$log" | tail -n 1 | cut -c1-200)"

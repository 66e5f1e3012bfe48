#!/usr/bin/env bash
# Starts our server on the Llama-3-8B shape (dummy weights) on a GPU host and prints how long it
# took to serve and each start-up phase the worker logs (graph captures, LM head, allocators):
#   bash benchmarks/device/serve_start.sh [seconds, default 240] [serve flags...]
# `gpu_session.sh start` runs it after installing the wheels in /tmp/site; the log goes to
# $OUT/serve_start.log.
set -uo pipefail
limit=${1:-240}; shift || true
export PYTHONPATH=/tmp/site:$PWD OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
log=$OUT/serve_start.log
python3 -m sarathi.cli serve --model dummy:llama3-8b --device cuda --port 50071 "$@" > "$log" 2>&1 &
pid=$!
python3 - "$limit" <<'PY'
import sys, time
from sarathi.client import wait_serving
t0 = time.perf_counter()
wait_serving("127.0.0.1:50071", timeout=float(sys.argv[1]))
print(f"serving after {time.perf_counter() - t0:.1f} s")
PY
kill -TERM $pid; wait $pid
grep -v "it/s]\|%|" "$log" | head -40

#!/usr/bin/env bash
# Runs the GPU tests on a GPU host and prints one PASS/FAIL line per test and a verdict; the full
# log goes to $OUT/gpu_tests.log (OUT defaults to /tmp). From the repo root, with the GPU wheels
# importable (`bash benchmarks/device/gpu_session.sh tests` installs them and runs this):
#   bash tests/gpu/run_on_device.sh [pytest args, e.g. -k runner]
set -o pipefail
log="${OUT:-/tmp}/gpu_tests.log"
# -v: a run stopped at its time limit still shows which test it was in.
python3 -m pytest -v -p no:cacheprovider --confcutdir=tests/gpu tests/gpu -rA "$@" >"$log" 2>&1
status=$?
grep -E "^(PASSED|FAILED|ERROR)" "$log" | sed 's/^PASSED/PASS/; s/^FAILED/FAIL/'
tail -n 1 "$log"
if [ "$status" -eq 0 ]; then echo "GPU TESTS: PASS"; else echo "GPU TESTS: FAIL ($status)"; fi
exit "$status"

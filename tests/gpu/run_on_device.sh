#!/usr/bin/env bash
# Runs the GPU tests on the device machine and prints one PASS/FAIL line per test and a verdict.
# Usage (from the repo root, after the wheel install line of ../shared/device/README.md):
#   bash tests/gpu/run_on_device.sh
set -o pipefail
python3 -m pytest -q -p no:cacheprovider tests/gpu -rA "$@" 2>&1 | tee "${OUT:-/tmp}/gpu_tests.log" \
  | grep -E "^(PASSED|FAILED|ERROR|SKIPPED)|passed|failed" | sed 's/^PASSED/PASS/; s/^FAILED/FAIL/'
status=${PIPESTATUS[0]}
if [ "$status" -eq 0 ]; then echo "GPU TESTS: PASS"; else echo "GPU TESTS: FAIL ($status)"; fi
exit "$status"

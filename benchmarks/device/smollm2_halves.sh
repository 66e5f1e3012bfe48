#!/usr/bin/env bash
# Splits the embedded SmolLM2 GGUF (98 MB) into two halves under .smol/a and .smol/b (git-ignored,
# 50 MB at most each), for a GPU host that receives files in limited transfers; on the host,
# `bash benchmarks/device/gpu_session.sh smollm2` after each half arrives joins them into ~/smol.
# Run from the repo root, with the project's environment active:
#   bash benchmarks/device/smollm2_halves.sh
set -euo pipefail
gguf=$(python3 -c "from sarathi_common.model_spec import resolve; print(resolve(None).location)")
grep -qx "/.smol/" .git/info/exclude 2>/dev/null || echo "/.smol/" >> .git/info/exclude
rm -rf .smol && mkdir -p .smol/a .smol/b
split -b 50000000 "$gguf" .smol/smolpart.
mv .smol/smolpart.aa .smol/a/ && mv .smol/smolpart.ab .smol/b/
ls -l .smol/a .smol/b
echo "then: bring .smol/a to the GPU host's checkout and run 'bash benchmarks/device/gpu_session.sh smollm2' there; the same with .smol/b"

#!/usr/bin/env bash
# Splits the embedded SmolLM2 GGUF into two halves under .smol/a and .smol/b (git-ignored), each
# small enough for one device call's carry (64 MiB); `benchmarks/gpu_session.sh smollm2` joins
# them on the device machine. Run from the repo root, with the project's environment active.
set -euo pipefail
gguf=$(python3 -c "from sarathi_common.model_spec import resolve; print(resolve(None).location)")
grep -qx "/.smol/" .git/info/exclude 2>/dev/null || echo "/.smol/" >> .git/info/exclude
rm -rf .smol && mkdir -p .smol/a .smol/b
split -b 50000000 "$gguf" .smol/smolpart.
mv .smol/smolpart.aa .smol/a/ && mv .smol/smolpart.ab .smol/b/
ls -l .smol/a .smol/b
echo "then: run(command=\"bash benchmarks/gpu_session.sh smollm2\", carry=[\".smol/a\"]), the same with .smol/b"

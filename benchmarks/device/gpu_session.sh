#!/usr/bin/env bash
# Runs GPU work on a GPU host without network access, from the root of a copy of this checkout:
#   bash benchmarks/device/gpu_session.sh PART...
# PART:
#   tests             tests/gpu (tests/gpu/run_on_device.sh; TEST_K: a pytest -k expression)
#   bench, bench-hf   python -m benchmarks.step.gpu_bench (bench-hf adds transformers generate)
#   profile           python -m benchmarks.step.decode_profile
#   attention         python -m benchmarks.kernels.attention_decode
#   chunk             python -m benchmarks.kernels.chunk_attention (with vLLM's FlashAttention 3
#                     where $VLLM_SITE, default /tmp/vllm, holds an unpacked vLLM)
#   overlap           python -m benchmarks.kernels.overlap (decode attention beside the GEMMs)
#   gemv              the GEMV kernel tests, then python -m benchmarks.kernels.gemv_sweep
#   overhead          python -m benchmarks.host.step_overhead on the Llama-3-8B shape
#   replica           python -m benchmarks.replica.replica_bench (several GPUs; REPLICA_ARGS)
#   start             our 8B server's time to serve and the worker's start-up phases
#                     (benchmarks/device/serve_start.sh; START_ARGS: serve flags)
#   capacity-strict, capacity-relaxed
#                     sarathi capacity of each policy under the strict or relaxed SLO
#   peer              python -m benchmarks.peer: vLLM 0.25 (AsyncLLM in-process, from $VLLM_SITE,
#                     default /tmp/vllm: unpack it there first with ../shared/device/vllm/carry's
#                     three calls) against our server, one table; see benchmarks/README.md
#   offline           1000 x (512 in, 256 out) at t = 0 through `sarathi bench` (the peer run's
#                     offline workload) with the scheduler's iteration trace (OFFLINE_BUDGET,
#                     default 2048; OFFLINE_MAX_SEQS, default 256 as vLLM's; OFFLINE_ARGS)
#   smollm2           (alone) joins the real SmolLM2 weights' halves into ~/smol, see below
# First it installs the wheels in .whl/ (git-ignored; fill it on a machine with PyPI with
# benchmarks/device/fetch_device_wheels.sh) into /tmp/site, once per host while .whl/ is
# unchanged, and regenerates the gRPC stubs for the host's grpcio. FlashInfer's JIT cache is
# restored from .fi_cache/fi.tgz when present and saved to $OUT/fi.tgz after every part, and
# Triton's from .fi_cache/triton.tgz to $OUT/triton.tgz (copy both
# to .fi_cache/ for the next run: it saves minutes of kernel compilation). Each part runs under
# its own time limit; output files go to $OUT (default /tmp/out).
# Environment: PART_LIMIT_S (seconds per part, default 300), TEST_K, BENCH_ARGS, PROFILE_ARGS,
# ATTENTION_ARGS, CHUNK_ARGS, OVERLAP_ARGS, OVERHEAD_ARGS (e.g. "--server-arg=--no-overlap"), REPLICA_ARGS, SMOLLM2_GGUF
# (the real weights, for the transformers agreement test), CAPACITY_MODEL (default
# dummy:llama3-8b), CAPACITY_SCALE (trace length scale, default 1), CAPACITY_POLICIES,
# CAPACITY_REQUESTS, CAPACITY_PROBES, CAPACITY_RATE, CAPACITY_PROBE_SECONDS (seconds of arrivals
# per probe, default 15: shorter probes at high rates are bursts, not a steady state),
# CAPACITY_ARGS (extra capacity arguments). peer: PEER_LIMIT_S (the whole part, default 570: it
# is meant to be a call of its own), PEER_SYSTEMS (default vllm:2048,sarathi:512), PEER_PROBES
# (default 2), PEER_RATE (first probe, req/s, default 4), PEER_PROBE_SECONDS (default 15),
# PEER_SYSTEM_LIMIT_S (per system, its start included, default 250), PEER_SLO_MS (the P99 TBT
# bound; unset: measured from vLLM's decode step), PEER_ARGS (e.g. --skip-offline), VLLM_SITE.
#
# The real SmolLM2 weights (98 MB) can reach the host in two halves where one transfer is
# limited: benchmarks/device/smollm2_halves.sh splits them into .smol/a and .smol/b; with either
# half in the checkout, `gpu_session.sh smollm2` moves it to ~/smol and joins the two once both
# are there; later parts find ~/smol's copy.
set -uo pipefail
# NVLink multicast stays off (on a shared multi-GPU host a program using it can take the GPUs
# out of service): every process started from here inherits these.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
smol=~/smol/SmolLM2-135M-Instruct.Q4_1.gguf
if [ "$*" = smollm2 ]; then  # needs no wheels: only moves a half into ~/smol
    mkdir -p ~/smol && cp .smol/*/smolpart.* ~/smol/
    if [ -f ~/smol/smolpart.aa ] && [ -f ~/smol/smolpart.ab ]; then
        cat ~/smol/smolpart.aa ~/smol/smolpart.ab > "$smol" && rm ~/smol/smolpart.*
    fi
    ls -l ~/smol
    exit 0
fi
[ -z "${SMOLLM2_GGUF:-}" ] && [ -f "$smol" ] && export SMOLLM2_GGUF=$smol
# Installed once per host: a later run skips it while .whl/ is unchanged.
ls -l .whl/ > /tmp/wheels.now
if ! cmp -s /tmp/wheels.now /tmp/site/.wheels; then
    python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 \
        | grep -v "^WARNING: Target directory"
    cp /tmp/wheels.now /tmp/site/.wheels
fi
export PYTHONPATH=/tmp/site:$PWD
python3 -m protos.generate   # stubs for the host's grpcio (a grpcio-tools wheel of that version)
export OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" ~/.cache
[ -f .fi_cache/fi.tgz ] && tar xzf .fi_cache/fi.tgz -C ~/.cache
# Triton's compiled kernels too (a fresh machine compiles every variant the graphs capture).
[ -f .fi_cache/triton.tgz ] && mkdir -p ~/.triton && tar xzf .fi_cache/triton.tgz -C ~/.triton
limit=${PART_LIMIT_S:-300}
capacity() {  # $1: strict or relaxed
    local slo budget
    # Sarathi's token budget as the paper chose per SLO; vLLM and Orca take whole prompts (the
    # chat trace goes up to 8192 tokens), so theirs must hold the longest one.
    if [ "$1" = strict ]; then slo=5x; budget=512; else slo=25x; budget=2048; fi
    timeout "$limit" python3 -m sarathi.cli capacity --model "${CAPACITY_MODEL:-dummy:llama3-8b}" \
        --server-arg=--device=cuda \
        --policies "${CAPACITY_POLICIES:-sarathi:$budget,vllm:8192,orca:8192}" --slo-p99-tbt "$slo" \
        --lengths trace --trace chat --length-scale "${CAPACITY_SCALE:-1}" \
        --num-requests "${CAPACITY_REQUESTS:-64}" \
        --max-probes "${CAPACITY_PROBES:-5}" --rel-tol 0.2 --initial-rate "${CAPACITY_RATE:-2}" \
        --probe-seconds "${CAPACITY_PROBE_SECONDS:-15}" \
        ${CAPACITY_ARGS:-} \
        --startup-timeout 300 --no-progress --output-dir "$OUT/capacity-$1"
}
peer() {
    local vsite=${VLLM_SITE:-/tmp/vllm} systems=${PEER_SYSTEMS:-vllm:2048,sarathi:512}
    # Only vLLM's systems need it (ours alone: give PEER_SLO_MS, the bound vLLM's step would set).
    if echo ",$systems" | grep -q ",vllm:" && [ ! -d "$vsite/vllm" ]; then
        echo "no vLLM in $vsite: unpack it first (../shared/device/vllm/carry)"; return 1
    fi
    # vLLM's folder goes first for this process only; our server gets the project's path alone.
    # The FlashInfer sampler is off as in the shared anchor run (it JIT-compiles for minutes).
    PYTHONPATH=$vsite:$PYTHONPATH VLLM_USE_FLASHINFER_SAMPLER=0 timeout "${PEER_LIMIT_S:-570}" \
        python3 -m benchmarks.peer --systems "$systems" \
        --max-probes "${PEER_PROBES:-2}" --initial-rate "${PEER_RATE:-4}" \
        --probe-seconds "${PEER_PROBE_SECONDS:-15}" --system-time-limit "${PEER_SYSTEM_LIMIT_S:-250}" \
        ${PEER_SLO_MS:+--slo-p99-tbt-ms "$PEER_SLO_MS"} --server-env "PYTHONPATH=$PYTHONPATH" \
        --no-progress --out "$OUT/peer" ${PEER_ARGS:-}
}
offline() {  # the peer run's offline workload through `sarathi bench`, with the iteration trace
    local budget=${OFFLINE_BUDGET:-2048} seqs=${OFFLINE_MAX_SEQS:-256}
    timeout "$limit" python3 -m sarathi.cli bench --model dummy:llama3-8b --server-arg=--device=cuda \
        --server-arg=--max-batch-size="$seqs" --policy sarathi --chunk-size "$budget" \
        --num-requests 1000 --lengths fixed --prompt-tokens 512 --output-tokens 256 --arrivals static \
        ${OFFLINE_ARGS:-} --startup-timeout 300 --no-progress --output-dir "$OUT/offline-$budget-$seqs"
}
for part in "$@"; do
    echo "=== $part ($(date -u +%T))"
    case $part in
        tests) timeout "$limit" bash tests/gpu/run_on_device.sh ${TEST_K:+-k "$TEST_K"} ;;
        bench) timeout "$limit" python3 -m benchmarks.step.gpu_bench --steps 30 --no-hf --out "$OUT" \
            ${BENCH_ARGS:-} ;;
        bench-hf) timeout "$limit" python3 -m benchmarks.step.gpu_bench --steps 30 --out "$OUT" \
            ${BENCH_ARGS:-} ;;
        profile) timeout "$limit" python3 -m benchmarks.step.decode_profile ${PROFILE_ARGS:-} ;;
        attention) timeout "$limit" python3 -m benchmarks.kernels.attention_decode ${ATTENTION_ARGS:-} ;;
        # vLLM's FlashAttention 3 joins the table where the peer sitting has unpacked vLLM.
        chunk) PYTHONPATH=${VLLM_SITE:-/tmp/vllm}:$PYTHONPATH timeout "$limit" \
            python3 -m benchmarks.kernels.chunk_attention ${CHUNK_ARGS:-} ;;
        overlap) timeout "$limit" python3 -m benchmarks.kernels.overlap ${OVERLAP_ARGS:-} ;;
        gemv) timeout "$limit" bash tests/gpu/run_on_device.sh -k gemv | tail -2
              timeout "$limit" python3 -m benchmarks.kernels.gemv_sweep ;;
        overhead) timeout "$limit" python3 -m benchmarks.host.step_overhead --model dummy:llama3-8b \
            --device cuda --batches 1 32 128 ${OVERHEAD_ARGS:-} ;;
        replica) timeout "$limit" python3 -m benchmarks.replica.replica_bench ${REPLICA_ARGS:-} ;;
        start) bash benchmarks/device/serve_start.sh "$((limit - 20))" ${START_ARGS:-} ;;
        peer) peer ;;
        offline) offline ;;
        capacity-strict) capacity strict ;;
        capacity-relaxed) capacity relaxed ;;
        *) echo "unknown part $part" ;;
    esac
    echo "=== $part: exit $? ($(date -u +%T))"
    # After every part, so that a run stopped at its time limit still leaves the cache in $OUT.
    tar czf "$OUT/fi.tgz" -C ~/.cache flashinfer 2>/dev/null
    [ -d ~/.triton/cache ] && tar czf "$OUT/triton.tgz" -C ~/.triton cache 2>/dev/null
done

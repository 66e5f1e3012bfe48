#!/usr/bin/env bash
# One sitting of the peer comparison (issue 22: vLLM 0.25 and our server, same GPU machine, same
# session), as three GPU-machine calls made back to back while the machine stays warm (30 s).
# Build the carry folders first: ../shared/device/vllm/carry (.vca .vcb .vcc) and
# benchmarks/device/fetch_device_wheels.sh (.whl). Then, from the project root:
#   1) carry .vca             bash benchmarks/device/peer_sitting.sh unpack
#   2) carry .vcb .whl        bash benchmarks/device/peer_sitting.sh ours
#   3) carry .vcc             bash benchmarks/device/peer_sitting.sh vllm
# or, offline throughput alone (acceptance 2), at vLLM's cap of 256 sequences per step and at 512
# (OFFLINE_SEQS: other caps; OURS_OFFLINE_SYSTEM, VLLM_OFFLINE_SYSTEM: other budgets, e.g. sarathi:4096):
#   1) carry .vca .fi_cache   unpack;  2) carry .vcb .whl  ours-offline;  3) carry .vcc  vllm-offline
#   (TESTS_LIMIT_S=N: then tests/gpu for N seconds); each leaves one .tgz of its results in $OUT.
# (the folders do not fit one 64 MiB carry together). `ours` runs our SLO-driven budget's
# capacity search (from OURS_RATE req/s) and our static-2048 offline throughput; `vllm` measures
# vLLM's decode step (the SLO anchor), then its offline throughput and capacity at budgets 2048
# and 512. Ours is judged against PEER_SLO_MS (default 45.8 = 5 x 9.16 ms, vLLM's step on an
# H200 on 2026-11-29); the `vllm` call prints this sitting's own anchor beside it.
# On a machine of its own (carry .whl .fi_cache): `more` runs our static budgets' capacity
# (sarathi:512 from 6 req/s, sarathi:2048 from 4) and one more probe of the SLO-driven budget
# (OURS_RATE2, default 12.5 req/s), then tests/gpu last: after a GPU-test run cut at its limit,
# servers on that machine were seen never to come up (2026-12-03, not diagnosed). `probe` is one
# SLO-driven probe, then the GPU tests but the kernels'.
# Outputs: $OUT/<part>/peer/{peer.json,peer.png,...}; FlashInfer's cache in $OUT/<part>/fi.tgz.
set -uo pipefail
export OUT=${OUT:-/tmp/out}
vsite=${VLLM_SITE:-/tmp/vllm}
session=benchmarks/device/gpu_session.sh
offline_runs() {  # $1: ours|vllm, $2: the system, $3: seconds per run; one .tgz of all in $OUT
    local name=$1 system=$2 limit=$3 seqs_list=${OFFLINE_SEQS:-256 512} seqs
    for seqs in $seqs_list; do
        OUT=$OUT/$name-$seqs PEER_SYSTEMS=$system PEER_SLO_MS=${PEER_SLO_MS:-45.8} \
            PEER_ARGS="--skip-capacity --vllm-max-num-seqs $seqs" PEER_LIMIT_S=$limit \
            PEER_SYSTEM_LIMIT_S=$limit bash $session peer 2>&1 | grep -E "offline|up in|Error|error" | tail -6
        tail -3 "$OUT/$name-$seqs"/peer/server-*.log 2>/dev/null   # ours only: its server's log
    done
    # The last run's FlashInfer cache is the fullest (vLLM's runs compile none of ours).
    [ "$name" = ours ] && mv "$OUT/$name-${seqs_list##* }/fi.tgz" "$OUT/fi.tgz"
    rm -f "$OUT/$name"-*/fi.tgz "$OUT/$name"-*/peer/*.png
    tar czf "$OUT/$name-offline.tgz" -C "$OUT" $(cd "$OUT" && ls -d "$name"-*/) && rm -rf "$OUT/$name"-*/
}
case ${1:-} in
    unpack)  # FlashInfer's cache too, where carried: the later calls have no room for it
        mkdir -p "$vsite" && tar -xJf .vca/v_c.tar.xz -C "$vsite" && du -sh "$vsite"
        [ -f .fi_cache/fi.tgz ] && mkdir -p ~/.cache && tar xzf .fi_cache/fi.tgz -C ~/.cache ;;
    ours-offline)  # our offline throughput at each of OFFLINE_SEQS (caps on sequences per step)
        mkdir -p "$vsite" && tar -xJf .vcb/v_rest.tar.xz -C "$vsite" && du -sh "$vsite"
        # ~170 s per run on an H200 (start, warm-up, 27 s of requests): 150 s cut one short.
        offline_runs ours "${OURS_OFFLINE_SYSTEM:-sarathi:2048}" 200 ;;
    vllm-offline)  # vLLM's offline throughput at each of OFFLINE_SEQS, then the GPU tests
        python3 -m pip install -q --no-index --no-deps --no-compile --target "$vsite" .vcc/*.whl 2>&1 \
            | grep -v "^WARNING: Target directory"
        offline_runs vllm "${VLLM_OFFLINE_SYSTEM:-vllm:2048}" 200
        [ -n "${TESTS_LIMIT_S:-}" ] && PART_LIMIT_S=$TESTS_LIMIT_S bash $session tests 2>&1 | tail -25 ;;
    ours)
        mkdir -p "$vsite" && tar -xJf .vcb/v_rest.tar.xz -C "$vsite" && du -sh "$vsite"
        slo=${PEER_SLO_MS:-45.8}
        OUT=$OUT/ours-slo PEER_SYSTEMS=sarathi:2048@slo PEER_SLO_MS=$slo PEER_ARGS=--skip-offline \
            PEER_RATE=${OURS_RATE:-10} PEER_PROBES=${OURS_PROBES:-3} PEER_LIMIT_S=${OURS_SLO_LIMIT_S:-340} \
            PEER_SYSTEM_LIMIT_S=${OURS_SLO_LIMIT_S:-340} bash $session peer
        OUT=$OUT/ours-offline PEER_SYSTEMS=sarathi:2048 PEER_SLO_MS=$slo PEER_ARGS=--skip-capacity \
            PEER_LIMIT_S=${OURS_OFFLINE_LIMIT_S:-200} PEER_SYSTEM_LIMIT_S=${OURS_OFFLINE_LIMIT_S:-200} \
            bash $session peer
        rm -f "$OUT/ours-slo/fi.tgz" ;;  # the second part's copy is the fuller one
    vllm)
        python3 -m pip install -q --no-index --no-deps --no-compile --target "$vsite" .vcc/*.whl 2>&1 \
            | grep -v "^WARNING: Target directory"
        OUT=$OUT/vllm PEER_SYSTEMS=${VLLM_SYSTEMS:-vllm:2048,vllm:512} PEER_RATE=${VLLM_RATE:-4} \
            PEER_PROBES=${VLLM_PROBES:-3} PEER_LIMIT_S=${VLLM_LIMIT_S:-560} \
            PEER_SYSTEM_LIMIT_S=${VLLM_SYSTEM_LIMIT_S:-275} bash $session peer
        rm -f "$OUT/vllm/fi.tgz" ;;  # vLLM's run compiles none of ours
    more)
        slo=${PEER_SLO_MS:-45.8}
        OUT=$OUT/ours-512 PEER_SYSTEMS=sarathi:512 PEER_SLO_MS=$slo PEER_ARGS=--skip-offline PEER_RATE=6 \
            PEER_PROBES=3 PEER_LIMIT_S=150 PEER_SYSTEM_LIMIT_S=150 bash $session peer 2>&1 | tail -22
        OUT=$OUT/ours-2048 PEER_SYSTEMS=sarathi:2048 PEER_SLO_MS=$slo PEER_ARGS=--skip-offline PEER_RATE=4 \
            PEER_PROBES=2 PEER_LIMIT_S=100 PEER_SYSTEM_LIMIT_S=100 bash $session peer 2>&1 | tail -20
        OUT=$OUT/ours-slo2 PEER_SYSTEMS=sarathi:2048@slo PEER_SLO_MS=$slo PEER_ARGS=--skip-offline \
            PEER_RATE=${OURS_RATE2:-12.5} PEER_PROBES=1 PEER_LIMIT_S=90 PEER_SYSTEM_LIMIT_S=90 \
            bash $session peer 2>&1 | tail -20
        PART_LIMIT_S=${TESTS_LIMIT_S:-230} bash $session tests 2>&1 | tail -25
        rm -f "$OUT"/ours-*/fi.tgz ;;
    probe)  # one probe of the SLO-driven budget at OURS_RATE2, then the GPU tests but the kernels'
        OUT=$OUT/ours-slo3 PEER_SYSTEMS=sarathi:2048@slo PEER_SLO_MS=${PEER_SLO_MS:-45.8} PEER_ARGS=--skip-offline \
            PEER_RATE=${OURS_RATE2:-12.5} PEER_PROBES=1 PEER_LIMIT_S=${PROBE_LIMIT_S:-110} \
            PEER_SYSTEM_LIMIT_S=${PROBE_LIMIT_S:-110} bash $session peer 2>&1 | tail -12
        PART_LIMIT_S=${TESTS_LIMIT_S:-90} TEST_K="not test_kernels_gpu" bash $session tests 2>&1 | tail -25
        grep -E "PASSED|FAILED|ERROR|SKIPPED" "$OUT/gpu_tests.log" | tail -30
        nvidia-smi --query-compute-apps=pid,used_memory --format=csv; rm -f "$OUT"/ours-*/fi.tgz ;;
    *) echo "usage: $0 unpack|ours|vllm|ours-offline|vllm-offline|more|probe"; exit 2 ;;
esac

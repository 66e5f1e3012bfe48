#!/usr/bin/env bash
# Multi-GPU runs on one host of two or more GPUs, from the root of a copy of this checkout
# prepared as for gpu_session.sh (.whl/, and .fi_cache/ when there is one). Each part runs through
# benchmarks/device/gpu_session.sh (wheels, stubs, FlashInfer's JIT cache, NVLink multicast off)
# under its own limit, cut to what is left of the whole run's budget (CALL_S, default 590 s from
# this script's start); a part with under 30 s left is skipped and says so.
#   bash benchmarks/device/multi_gpu_session.sh replica-8b tests replica-70b capacity-70b
# Parts:
#   tests         TEST_K=parallel: tests/gpu/test_parallel_gpu.py (tiny float32, through `serve`) and
#                 tests/gpu/test_parallel_bf16_gpu.py (Llama-3-8B shape bf16 at TP=2 and PP=2; the real
#                 SmolLM2 at PP=2 where its halves were brought first, see gpu_session.sh)
#   replica-8b    python -m benchmarks.replica.replica_bench: Llama-3-8B shape on 1 GPU and at TP=2
#   replica-70b   the same for the Llama-3-70B shape at TP=2 and PP=2
#   allreduce     python -m benchmarks.replica.allreduce_latency (NCCL all-reduce latency, eager and
#                 in a graph), with the transport NCCL chose
#   capacity-70b  strict-SLO capacity of the 70B shape at TP=2, sarathi:512 vs vllm:8192 (chat trace
#                 at half length); CAPACITY_* as in gpu_session.sh override the defaults here
# Environment: CALL_S, TEST_K, CAPACITY_POLICIES, CAPACITY_SCALE, CAPACITY_RATE, CAPACITY_PROBES,
# CAPACITY_ARGS; the rest as gpu_session.sh reads it.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1   # as gpu_session.sh
start=$(date +%s)
call=${CALL_S:-590}
run_part() {  # $1: the part's most seconds; the rest: env assignments and the command
    local most=$1 left
    shift
    left=$((call - ($(date +%s) - start)))
    [ "$left" -gt "$most" ] && left=$most
    if [ "$left" -lt 30 ]; then
        echo "=== skipped (${left} s left of the run): $*"
        return
    fi
    env PART_LIMIT_S="$left" "$@"
}
for part in "$@"; do
    case $part in
        # Verbose, and a stuck test ends the run with every thread's stack in the log.
        tests) run_part 420 TEST_K="${TEST_K:-parallel}" PYTEST_ADDOPTS="-vv --timeout=200 --timeout-method=thread" \
            bash benchmarks/device/gpu_session.sh tests ;;
        replica-8b) run_part 240 REPLICA_ARGS="--model llama3-8b --layouts 1x1 2x1 --batches 1 64 --prefill 2048 8192" \
            bash benchmarks/device/gpu_session.sh replica ;;
        replica-70b) run_part 300 REPLICA_ARGS="--model llama3-70b --layouts 2x1 1x2 --batches 1 64 --prefill 2048 8192" \
            bash benchmarks/device/gpu_session.sh replica ;;
        capacity-70b) run_part 590 CAPACITY_MODEL=dummy:llama3-70b \
            CAPACITY_POLICIES="${CAPACITY_POLICIES:-sarathi:512,vllm:8192}" CAPACITY_SCALE="${CAPACITY_SCALE:-0.5}" \
            CAPACITY_RATE="${CAPACITY_RATE:-1}" CAPACITY_PROBES="${CAPACITY_PROBES:-4}" \
            CAPACITY_ARGS="--server-arg=--tensor-parallel-size=2 ${CAPACITY_ARGS:-}" \
            bash benchmarks/device/gpu_session.sh capacity-strict ;;
        allreduce) echo "=== allreduce ($(date -u +%T))"
            run_part 90 NCCL_DEBUG=INFO PYTHONPATH="$PWD" timeout 90 python3 -m benchmarks.replica.allreduce_latency 2>&1 \
                | grep -E "^\||^NCCL all|via (P2P|SHM|NET)" | sed -E 's/^.*NCCL INFO //; s/Channel [0-9]+\/[0-9]+/Channel N/' \
                | awk '!seen[$0]++' | head -20 ;;
        *) echo "unknown part $part" ;;
    esac
done

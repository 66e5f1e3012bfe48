"""Replicas of several ranks, driven at rank 0 without a scheduler: decode and prefill against the
shards' floors (replica_bench), the TP/PP handoff's bytes and time on the CPU (parallel_handoff),
NCCL all-reduce latency (allreduce_latency); `launch` starts a replica's ranks on this host
(shared with the tests)."""

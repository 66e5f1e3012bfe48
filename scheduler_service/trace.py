"""The per-iteration trace: one record per engine iteration, and its one conversion to the proto.

The record is the only shape of an iteration's data: the engine fills it, keeps it in its trace,
sends it to the frontend with each step's stats, and `to_proto` maps it onto IterationTrace by
field name (the worker's timings as `worker_<name>`). A new field goes into the record (or the
worker's StepTimings) and into the proto, nowhere else.
"""

from __future__ import annotations

import dataclasses

import msgspec

from protos import generation_pb2
from protos.batch_plan import StepTimings


class IterationRecord(msgspec.Struct, array_like=True):
    """One iteration as the scheduler saw it (for tests, metrics and trace dumps)."""

    step_id: int
    start_s: float                # monotonic seconds, when scheduling began
    schedule_s: float             # the policy and plan building
    num_prefill_tokens: int
    num_decode_tokens: int
    decode_seq_ids: list[int]
    prefill_seq_ids: list[int]
    num_preempted: int
    kv_blocks_used: int           # when the iteration was scheduled
    num_waiting: int              # when the iteration was scheduled
    duration_s: float = 0.0       # scheduling began -> result applied
    round_trip_s: float = 0.0     # plan sent -> result received (includes queueing behind N-1)
    # The worker's own account of the step: idle_ns is the gap to remove (the device sat idle
    # before this step), queued_ns the wait in the worker (overlap: behind the step before).
    worker: StepTimings = msgspec.field(default_factory=StepTimings)
    replica: int = 0              # which replica ran it
    # The latency model's device time for this iteration when it was formed (0: no model yet),
    # against worker.device_ns; and the SLO budget's safety margin then (relative).
    predicted_ms: float = 0.0
    slo_margin: float = 0.0

    @property
    def seq_ids(self) -> list[int]:
        return self.decode_seq_ids + self.prefill_seq_ids


def to_proto(record: IterationRecord) -> generation_pb2.IterationTrace:
    """The proto constructor rejects a name it does not know, so the record and the proto
    cannot drift apart silently."""
    fields = {name: getattr(record, name) for name in record.__struct_fields__ if name != "worker"}
    timings = {f"worker_{name}": value for name, value in dataclasses.asdict(record.worker).items()}
    return generation_pb2.IterationTrace(**fields, **timings)

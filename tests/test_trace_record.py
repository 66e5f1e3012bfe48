"""The iteration record maps onto every field of the IterationTrace proto, by name."""

from __future__ import annotations

from protos import generation_pb2 as pb
from protos.batch_plan import StepTimings
from scheduler_service.trace import IterationRecord, to_proto


def test_every_field_of_the_proto_comes_from_the_record():
    record = IterationRecord(
        step_id=7, start_s=1.5, schedule_s=0.25, num_prefill_tokens=60, num_decode_tokens=4,
        decode_seq_ids=[1, 2, 3, 4], prefill_seq_ids=[9], num_preempted=1, kv_blocks_used=33,
        num_waiting=2, duration_s=0.5, round_trip_s=0.125,
        worker=StepTimings(queued_ns=11, prepare_ns=12, forward_ns=13, sample_ns=14, idle_ns=15,
                           device_ns=16), replica=2, predicted_ms=0.02, slo_margin=0.1)
    msg = to_proto(record)
    assert {f.name for f, _ in msg.ListFields()} == {f.name for f in pb.IterationTrace.DESCRIPTOR.fields}
    assert (msg.start_s, msg.worker_queued_ns, msg.worker_device_ns) == (1.5, 11, 16)
    assert list(msg.decode_seq_ids) == [1, 2, 3, 4] and list(msg.prefill_seq_ids) == [9]
    assert (msg.predicted_ms, msg.slo_margin) == (0.02, 0.1)

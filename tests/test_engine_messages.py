"""Every frontend <-> engine message survives the link's codec unchanged."""

from __future__ import annotations

import pytest

from protos.batch_plan import SamplingOptions, StepTimings
from scheduler_service.messages import (
    AbortRequest,
    AddRequest,
    EngineFailed,
    EngineReady,
    EngineStats,
    GetTrace,
    RequestRejected,
    RequestUpdate,
    StepUpdates,
    Trace,
    decode_command,
    decode_event,
    encode,
)
from scheduler_service.request import FinishReason
from scheduler_service.trace import IterationRecord

RECORD = IterationRecord(step_id=3, start_s=10.5, schedule_s=1e-4, num_prefill_tokens=60, num_decode_tokens=2,
                         decode_seq_ids=[1, 2], prefill_seq_ids=[5], num_preempted=0, kv_blocks_used=9,
                         num_waiting=1, duration_s=0.02, round_trip_s=0.018,
                         worker=StepTimings(queued_ns=1, prepare_ns=2, forward_ns=3, sample_ns=4, idle_ns=5,
                                            device_ns=6))


@pytest.mark.parametrize("msg", [
    AddRequest(seq_id=5, prompt_token_ids=[1, 2, 3], sampling=SamplingOptions(0.7, 0.9, 40, seed=3),
               max_tokens=8, stop_token_ids=frozenset({2}), priority=1, arrival_time=10.25),
    AddRequest(seq_id=6, prompt_token_ids=[4], sampling=SamplingOptions(), max_tokens=1,
               stop_token_ids=frozenset(), priority=0, arrival_time=11.0),
    AbortRequest(5),
    GetTrace(),
])
def test_commands_round_trip(msg):
    assert decode_command(encode(msg)) == msg


@pytest.mark.parametrize("msg", [
    EngineReady(model="m", max_model_len=2048, vocab_size=49152, eos_token_ids=[2], block_size=16,
                num_kv_blocks=100, dtype="float32", device="cpu"),
    StepUpdates([RequestUpdate(1, [7], None, 0.01), RequestUpdate(2, [8], FinishReason.LENGTH)],
                EngineStats(iteration=RECORD, num_running=1, num_waiting=0, kv_blocks_used=8,
                            kv_blocks_total=100, preemptions_total=0, prefix_cache_query_tokens=60)),
    RequestRejected(5, "too long"),
    EngineFailed("the worker went away"),
    Trace([RECORD, RECORD]),
])
def test_events_round_trip(msg):
    decoded = decode_event(encode(msg))
    assert decoded == msg and type(decoded) is type(msg)

"""benchmarks/host/step_overhead's arithmetic on hand-built traces: which iterations count, and the
idle share they give."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from benchmarks.host.step_overhead import summarize


def step(prefill: int, decode: int, device_ms: float, idle_ms: float):
    return SimpleNamespace(num_prefill_tokens=prefill, num_decode_tokens=decode,
                           worker_device_ns=int(device_ms * 1e6), worker_idle_ns=int(idle_ms * 1e6))


def test_decode_rows_count_only_steps_that_decode_the_whole_batch():
    steps = [step(0, 4, 10.0, 50.0),                       # first: no predecessor, dropped
             step(0, 4, 10.0, 0.0), step(0, 4, 10.0, 1.0),
             step(0, 3, 99.0, 99.0),                       # ramp-down: not the whole batch
             step(512, 4, 99.0, 99.0)]                     # hybrid: not a decode row
    row = summarize("decode, batch 4", True, steps, [0.010, 0.012], hybrid=False, batch=4)
    assert row.iterations == 2
    assert row.busy_ms == pytest.approx(10.0)
    assert row.idle_share == pytest.approx(1.0 / 21.0)
    assert row.tbt_ms == pytest.approx(11.0)


def test_hybrid_rows_count_steps_with_prefill_and_decodes():
    steps = [step(512, 4, 20.0, 0.0), step(512, 4, 20.0, 5.0), step(512, 4, 30.0, 5.0),
             step(0, 4, 10.0, 0.0), step(512, 0, 40.0, 40.0)]
    row = summarize("hybrid", True, steps, [], hybrid=True, batch=4)
    assert row.iterations == 2
    assert row.idle_share == pytest.approx(10.0 / 60.0)

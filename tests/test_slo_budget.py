"""sarathi with --tbt-slo-ms: each iteration's prefill sized by the fitted latency model, driven
without a model (scheduler_sim); the worker's measured device times arrive as StepTimings."""

from __future__ import annotations

import numpy as np
import pytest
from scheduler_sim import make_request, make_scheduler, simulated_output

from protos.batch_plan import StepTimings
from scheduler_service.config import SchedulerConfig
from scheduler_service.policies.latency_model import IterationShape
from scheduler_service.profile import profile_shapes

# A device where a step costs 5 ms + 0.05 ms a prefill token + 0.1 ms a decode + KV reads.
COST = np.array([5.0, 0.05, 0.0, 0.0, 0.1, 1e-4])


def cost_ms(shape: IterationShape) -> float:
    return float(shape.features() @ COST)


def slo_scheduler(target_ms: float, *, profiled: bool = True, **kw):
    kw.setdefault("token_budget", 1024)
    kw.setdefault("max_batch_size", 256)
    kw.setdefault("min_chunk_size", 16)
    sched = make_scheduler("sarathi", num_blocks=4000, tbt_slo_ms=target_ms, **kw)
    if profiled:
        shapes = [IterationShape().with_chunk(0, n) for n in (64, 256, 1024)]
        for d in (1, 16, 128):
            s = IterationShape()
            for _ in range(d):
                s = s.with_decode(512)
            shapes.append(s)
            shapes.append(s.with_chunk(100, 200))
        latency = sched.policy.latency
        latency.warm_start([(s, cost_ms(s)) for s in shapes])
        latency.margin.value = 0.0
    return sched


def measured_step(sched, noise: float = 0.0, rng: np.random.Generator | None = None):
    """One iteration; the worker 'measures' the true cost of what was scheduled."""
    plan = sched.schedule()
    shape = shape_of_plan(sched, plan)
    out = simulated_output(sched, plan)
    ms = cost_ms(shape) * (1 + (rng.normal(0, noise) if rng is not None else 0.0))
    out.timings = StepTimings(device_ns=int(ms * 1e6))
    sched.update(out)
    return plan, shape


def shape_of_plan(sched, plan) -> IterationShape:
    shape = IterationShape()
    for seq, computed, n in zip(plan.seq_ids, plan.num_computed_tokens, plan.num_scheduled_tokens,
                                strict=True):
        req = sched.requests.get(seq)
        if n == 1 and req is not None and computed >= req.num_prompt_tokens:
            shape = shape.with_decode(computed + 1)
        else:
            shape = shape.with_chunk(computed, n)
    return shape


def prefill_of(sched, plan, seq_id: int) -> int:
    return dict(zip(plan.seq_ids, plan.num_scheduled_tokens, strict=True)).get(seq_id, 0)


def start_decodes(sched, count: int, first_id: int = 1000) -> None:
    for i in range(count):
        sched.add(make_request(first_id + i, prompt_len=8, max_tokens=10_000))
    for _ in range(100):
        if all(sched.requests[first_id + i].is_decoding for i in range(count)):
            return
        measured_step(sched)
    raise AssertionError("the decodes never started")


def test_alone_a_prompt_takes_the_tokens_the_target_allows():
    sched = slo_scheduler(20.0)
    sched.add(make_request(0, prompt_len=5000, max_tokens=1))
    plan, shape = measured_step(sched)
    # 5 ms fixed + 0.05 ms a token within 20 ms: 300 tokens, in multiples of 16.
    assert 280 <= prefill_of(sched, plan, 0) <= 300
    assert cost_ms(shape) <= 20.0


def test_chunks_shrink_as_decodes_grow_and_decodes_never_stall():
    sched = slo_scheduler(20.0)
    chunks, running = [], 0
    for count in (0, 40, 100):
        if count:
            start_decodes(sched, count - running, first_id=1000 + running)
            running = count
        sched.add(make_request(count, prompt_len=5000, max_tokens=1))
        plan, shape = measured_step(sched)
        chunks.append(prefill_of(sched, plan, count))
        assert sum(1 for n in plan.num_scheduled_tokens if n == 1) >= count, "a decode stalled"
        assert cost_ms(shape) <= 20.0 or chunks[-1] == 16
        sched.abort(count)
    assert chunks[0] > chunks[1] > chunks[2] >= 16


def test_the_chunk_never_passes_the_token_budget_nor_falls_below_the_smallest_chunk():
    roomy = slo_scheduler(1000.0, token_budget=256)
    roomy.add(make_request(0, prompt_len=5000, max_tokens=1))
    plan, _ = measured_step(roomy)
    assert prefill_of(roomy, plan, 0) == 256, "the token budget stays the cap"
    tight = slo_scheduler(1.0)   # below even the fixed cost
    tight.add(make_request(0, prompt_len=5000, max_tokens=1))
    plan, _ = measured_step(tight)
    assert prefill_of(tight, plan, 0) == 16, "prompts progress however tight the target"


def test_without_a_profile_it_starts_small_and_learns_from_the_iterations_it_runs():
    sched = slo_scheduler(20.0, profiled=False)
    sched.add(make_request(0, prompt_len=50_000, max_tokens=1))
    first, _ = measured_step(sched)
    assert prefill_of(sched, first, 0) == 1024 // 4, "a conservative budget until it can fit"
    rng = np.random.default_rng(0)
    for i in range(1, 40):   # varied shapes, so that the fit can tell the costs apart
        sched.add(make_request(i, prompt_len=int(rng.integers(4, 400)), max_tokens=int(rng.integers(1, 30))))
        measured_step(sched)
    assert sched.policy.latency.model.ready
    plan, shape = measured_step(sched)
    assert cost_ms(shape) <= 20.0 * 1.1 or prefill_of(sched, plan, 0) == 16


def test_measured_times_past_the_predictions_raise_the_margin_and_shrink_the_chunk():
    sched = slo_scheduler(20.0)
    sched.add(make_request(0, prompt_len=50_000, max_tokens=1))
    before, _ = measured_step(sched)
    latency = sched.policy.latency
    for _ in range(5):   # the device slows down by half: every step misses its prediction
        plan = sched.schedule()
        out = simulated_output(sched, plan)
        out.timings = StepTimings(device_ns=int(1.5 * cost_ms(shape_of_plan(sched, plan)) * 1e6))
        sched.update(out)
    assert latency.margin.value > 0.05
    after, _ = measured_step(sched)
    assert prefill_of(sched, after, 0) < prefill_of(sched, before, 0)


def test_prediction_errors_are_small_when_the_device_matches_the_model_class():
    rng = np.random.default_rng(1)
    sched = slo_scheduler(25.0)
    start_decodes(sched, 30)
    for i in range(60):
        if i % 10 == 0:
            sched.add(make_request(i, prompt_len=int(rng.integers(100, 3000)), max_tokens=5))
        measured_step(sched, noise=0.02, rng=rng)
    p50, p99 = sched.policy.latency.error_quantiles()
    assert p50 < 0.05 and p99 < 0.2


def test_a_time_between_tokens_target_applies_to_sarathi_only():
    assert SchedulerConfig(tbt_slo_ms=40.0).policy_config().tbt_slo_ms == 40.0
    with pytest.raises(ValueError, match="tbt-slo-ms"):
        SchedulerConfig(policy="vllm", tbt_slo_ms=40.0).policy_config()


def test_the_profile_fits_the_cache_the_budget_and_the_context():
    for budget, kv_tokens, max_len in ((512, 5800, 2048), (2048, 1_000_000, 8192), (64, 300, 128)):
        shapes = profile_shapes(budget, 128, kv_tokens, max_len)
        assert len(shapes) >= 4
        for s in shapes:
            assert s.num_decodes + s.num_chunks * s.chunk_tokens <= budget
            assert s.num_kv_tokens <= kv_tokens
            assert max(s.decode_context + 1, s.chunk_context + s.chunk_tokens) <= max_len
        kinds = {(s.num_decodes > 0, s.num_chunks > 0) for s in shapes}
        assert kinds == {(True, False), (False, True), (True, True)}

"""The latency model of the SLO budget: fitted online, non-negative, monotone; the margin."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler_service.policies.latency_model import (
    IterationShape,
    LatencyModel,
    LatencyModelConfig,
    LatencyTracker,
    SafetyMargin,
    fit_nonnegative,
)

TRUE = np.array([4.0, 0.02, 2e-6, 0.3, 0.05, 1.5e-4])   # ms: fixed, per token, per pair, ...


def random_shape(rng: np.random.Generator) -> IterationShape:
    shape = IterationShape()
    for _ in range(rng.integers(0, 64)):
        shape = shape.with_decode(int(rng.integers(16, 4096)))
    for _ in range(rng.integers(0, 3)):
        shape = shape.with_chunk(int(rng.integers(0, 4096)), int(rng.integers(1, 1024)))
    return shape if not shape.is_empty else shape.with_decode(1)


def true_ms(shape: IterationShape) -> float:
    return float(shape.features() @ TRUE)


def test_the_fit_recovers_known_linear_costs_from_noisy_samples():
    rng = np.random.default_rng(0)
    model = LatencyModel(LatencyModelConfig(window=400))
    shapes = [random_shape(rng) for _ in range(500)]
    for s in shapes:
        model.observe(s, true_ms(s) * (1 + rng.normal(0, 0.02)))
    model.refit()
    errors = [abs(model.predict_ms(s) - true_ms(s)) / true_ms(s) for s in shapes[-100:]]
    assert np.median(errors) < 0.02
    assert max(errors) < 0.1


def test_slow_outliers_barely_move_the_fit():
    rng = np.random.default_rng(1)
    x = np.stack([random_shape(rng).features() for _ in range(300)])
    y = x @ TRUE * (1 + rng.normal(0, 0.01, 300))
    y[::20] *= 5   # one step in twenty waited for a noisy neighbour
    b = fit_nonnegative(x, y)
    clean = x @ TRUE
    assert np.median(np.abs(x @ b - clean) / clean) < 0.03


def test_coefficients_stay_non_negative_even_when_least_squares_would_go_negative():
    rng = np.random.default_rng(2)
    x = np.stack([random_shape(rng).features() for _ in range(200)])
    # A cost that falls with decodes: plain least squares fits a negative slope.
    y = 10 + 0.02 * x[:, 1] - 0.01 * x[:, 4] + rng.normal(0, 0.1, 200)
    assert (fit_nonnegative(x, y) >= 0).all()


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), computed=st.integers(0, 8192), a=st.integers(1, 2048),
       more=st.integers(1, 2048), decodes=st.integers(0, 128), context=st.integers(1, 8192))
def test_predictions_never_fall_as_a_chunk_or_the_decodes_grow(seed, computed, a, more, decodes,
                                                               context):
    rng = np.random.default_rng(seed)
    model = LatencyModel()
    for _ in range(32):
        s = random_shape(rng)
        # Noise and a cost model it cannot represent exactly: monotonicity must hold anyway.
        model.observe(s, max(0.1, true_ms(s) * rng.lognormal(0, 0.3) - 3 * s.num_chunks))
    base = IterationShape()
    for _ in range(decodes):
        base = base.with_decode(context)
    small = model.predict_ms(base.with_chunk(computed, a))
    assert model.predict_ms(base.with_chunk(computed, a + more)) >= small
    assert model.predict_ms(base.with_decode(context).with_chunk(computed, a)) >= small


def test_directions_the_recent_traffic_does_not_excite_keep_what_the_profile_measured():
    rng = np.random.default_rng(3)
    model = LatencyModel(LatencyModelConfig(window=64))
    profile = [random_shape(rng) for _ in range(40)]
    model.warm_start([(s, true_ms(s)) for s in profile])
    chunk = IterationShape().with_chunk(0, 512)
    before = model.predict_ms(chunk)
    for _ in range(500):   # hours of decode-only iterations
        s = IterationShape()
        for _ in range(int(rng.integers(1, 64))):
            s = s.with_decode(int(rng.integers(16, 4096)))
        model.observe(s, true_ms(s))
    assert model.predict_ms(chunk) > 0.8 * before
    assert abs(model.predict_ms(chunk) - true_ms(chunk)) / true_ms(chunk) < 0.1


def test_without_a_profile_the_first_iterations_served_warm_the_model():
    model = LatencyModel(LatencyModelConfig(min_samples=8))
    rng = np.random.default_rng(4)
    for i in range(8):
        assert not model.ready, i
        s = random_shape(rng)
        model.observe(s, true_ms(s))
    assert model.ready


def test_the_margin_settles_where_about_one_iteration_in_a_hundred_runs_past_it():
    rng = np.random.default_rng(5)
    margin = SafetyMargin(quantile=0.99, step=0.01, value=0.0)
    errors = rng.lognormal(0, 0.1, 40000)   # measured / predicted
    for e in errors[:20000]:
        margin.observe(10.0, 10.0 * e)
    misses = 0
    for e in errors[20000:]:
        misses += e - 1 > margin.value
        margin.observe(10.0, 10.0 * e)
    assert 0.003 < misses / 20000 < 0.03
    assert abs(margin.value - (np.quantile(errors, 0.99) - 1)) < 0.05


def test_a_miss_raises_the_margin_and_quiet_iterations_lower_it_slowly():
    margin = SafetyMargin(value=0.1)
    margin.observe(10.0, 15.0)
    raised = margin.value
    assert raised > 0.1
    for _ in range(10):
        margin.observe(10.0, 10.0)
    assert 0.1 < margin.value < raised


def test_the_tracker_reports_the_prediction_error_of_what_it_predicted():
    tracker = LatencyTracker()
    shape = IterationShape().with_decode(10)
    for measured in (10.0, 10.0, 12.5, 8.0):
        tracker.observe(shape, 10.0, measured)
    p50, p99 = tracker.error_quantiles()
    assert 0.0 < p50 <= p99 <= 0.25 + 1e-9

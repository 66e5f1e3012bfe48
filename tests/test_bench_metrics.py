"""Metric computations on hand-built timelines: known gaps give known percentiles."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.serving.metrics import max_violations_within, percentile, summarize, summarize_run
from benchmarks.serving.records import RequestRecord

finite_latencies = st.lists(st.floats(min_value=0, max_value=1e4, allow_nan=False), min_size=1, max_size=300)


def timeline(
    index: int, arrival: float, chunk_times: list[float], finished: float | None = None
) -> RequestRecord:
    record = RequestRecord(index, 16, len(chunk_times), arrival, sent_s=arrival)
    record.chunk_times_s = list(chunk_times)
    record.chunk_num_tokens = [1] * len(chunk_times)
    if finished is not None:
        record.finished_s = finished
        record.finish_reason = "FINISH_REASON_LENGTH"
        record.num_completion_tokens = len(chunk_times)
    return record


def test_gaps_of_1_to_100_ms_have_nearest_rank_percentiles():
    gaps = [ms / 1000 for ms in range(100, 0, -1)]  # unsorted on purpose
    d = summarize(gaps)
    assert (d.count, d.p50, d.p90, d.p99, d.max) == (100, 0.050, 0.090, 0.099, 0.100)
    assert d.mean == pytest.approx(0.0505)


def test_one_slow_gap_in_a_thousand_stays_out_of_p99_but_two_in_a_hundred_do_not():
    assert summarize([0.01] * 999 + [5.0]).p99 == 0.01
    assert summarize([0.01] * 98 + [5.0, 5.0]).p99 == 5.0


def test_request_timeline_gives_ttft_gaps_e2e_and_normalized_latency():
    record = timeline(0, arrival=0.5, chunk_times=[1.0, 1.1, 1.3, 1.6], finished=1.6)
    assert record.ttft_s == pytest.approx(0.5)
    assert record.tbt_gaps_s == pytest.approx([0.1, 0.2, 0.3])
    assert record.e2e_s == pytest.approx(1.1)
    assert record.normalized_latency_s == pytest.approx(1.1 / 4)


def test_a_message_carrying_several_tokens_is_one_gap():
    record = timeline(0, 0.0, [1.0, 2.0])
    record.chunk_num_tokens = [1, 3]
    assert record.num_received_tokens == 4
    assert record.tbt_gaps_s == pytest.approx([1.0])


def test_failed_request_has_no_e2e_but_its_tokens_count():
    record = timeline(0, 0.0, [1.0, 1.5])
    record.error = "UNAVAILABLE: worker gone"
    assert not record.completed
    assert record.e2e_s is None and record.normalized_latency_s is None
    assert record.ttft_s == 1.0


def test_run_summary_pools_gaps_of_all_requests_and_measures_throughput():
    records = [
        timeline(0, 0.0, [0.2, 0.3, 0.4], finished=0.4),  # gaps 0.1, 0.1
        timeline(1, 1.0, [1.5, 1.8, 2.0], finished=2.0),  # gaps 0.3, 0.2
    ]
    s = summarize_run(records)
    assert (s.num_completed, s.num_failed) == (2, 0)
    assert s.duration_s == pytest.approx(2.0)
    assert s.request_throughput == pytest.approx(1.0)
    assert s.output_token_throughput == pytest.approx(3.0)
    assert s.ttft_s.p50 == pytest.approx(0.2) and s.ttft_s.max == pytest.approx(0.5)
    assert s.tbt_s.count == 4 and s.tbt_s.max == pytest.approx(0.3)
    assert s.tbt_s.p50 == pytest.approx(0.1)
    assert s.e2e_s.p99 == pytest.approx(1.0)
    assert s.scheduling_delay_s.count == 0 and math.isnan(s.scheduling_delay_s.p50)


def test_empty_values_summarize_to_nan_not_an_error():
    d = summarize([])
    assert d.count == 0 and math.isnan(d.p99)


def test_percentile_rejects_out_of_range_q():
    with pytest.raises(ValueError):
        percentile([1.0], 101)


@given(finite_latencies)
def test_percentiles_are_observed_values_in_order(values):
    d = summarize(values)
    assert d.p50 in values and d.p90 in values and d.p99 in values
    assert d.p50 <= d.p90 <= d.p99 <= d.max == max(values)


@given(finite_latencies, st.floats(min_value=0, max_value=1e4), st.sampled_from([50, 90, 99]))
def test_violation_budget_agrees_with_the_percentile(values, bound, q):
    """The early-fail rule relies on this: P_q <= bound exactly when at most
    max_violations_within(n, q) samples exceed the bound."""
    over = sum(v > bound for v in values)
    assert (percentile(values, q) <= bound) == (over <= max_violations_within(len(values), q))

"""Reading the server's Prometheus page: parsing, and per-run totals from first and last scrape."""

from __future__ import annotations

import pytest

from benchmarks.serving.server_metrics import MetricsTimeline, parse_prometheus_text

PAGE = """# HELP sarathi_requests_running Requests holding KV blocks
# TYPE sarathi_requests_running gauge
sarathi_requests_running 3.0
sarathi_iteration_seconds_bucket{le="0.1"} 7.0
sarathi_iteration_seconds_count 10.0
sarathi_iteration_seconds_sum 0.5
sarathi_requests_finished_total{reason="length"} 4.0
"""


def test_samples_are_read_by_name_with_their_labels():
    samples = parse_prometheus_text(PAGE)
    assert samples["sarathi_requests_running"] == 3.0
    assert samples['sarathi_iteration_seconds_bucket{le="0.1"}'] == 7.0
    assert samples['sarathi_requests_finished_total{reason="length"}'] == 4.0
    assert not any(name.startswith("#") for name in samples)


def test_run_totals_are_counter_increases_and_the_mean_iteration_time():
    before = {
        "sarathi_iteration_seconds_count": 10.0,
        "sarathi_iteration_seconds_sum": 0.5,
        "sarathi_generated_tokens_total": 100.0,
        "sarathi_preemptions_total": 1.0,
    }
    after = {
        "sarathi_iteration_seconds_count": 30.0,
        "sarathi_iteration_seconds_sum": 1.5,
        "sarathi_generated_tokens_total": 250.0,
        "sarathi_preemptions_total": 1.0,
    }
    totals = MetricsTimeline("u", [0.0, 1.0], [before, after]).run_totals()
    assert totals["iterations"] == 20 and totals["generated_tokens"] == 150 and totals["preemptions"] == 0
    assert totals["mean_iteration_s"] == pytest.approx(0.05)
    assert "prefill_tokens" not in totals  # absent from the page: not made up


def test_one_scrape_gives_no_totals():
    assert MetricsTimeline("u", [0.0], [{"sarathi_iteration_seconds_count": 1.0}]).run_totals() == {}


def test_times_shift_onto_the_run_clock():
    timeline = MetricsTimeline("u", [100.5, 101.0], [{}, {}]).shifted(100.0)
    assert timeline.times_s == [0.5, 1.0]

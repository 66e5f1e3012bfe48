"""SLO checks and the rule that ends a probe once its SLO is certainly broken."""

from __future__ import annotations

from benchmarks.serving.metrics import summarize_run
from benchmarks.serving.records import RequestRecord
from benchmarks.serving.slo import EarlyFailRule, Slo


def streaming(index: int, arrival: float, chunk_times: list[float], done: bool) -> RequestRecord:
    record = RequestRecord(index, 8, 10, arrival, sent_s=arrival)
    record.chunk_times_s = list(chunk_times)
    record.chunk_num_tokens = [1] * len(chunk_times)
    if done:
        record.finished_s = chunk_times[-1]
    return record


def test_a_run_within_every_bound_has_no_violations():
    records = [streaming(i, 0.0, [0.1, 0.2, 0.3], done=True) for i in range(4)]
    slo = Slo(p99_tbt_s=0.15, p99_ttft_s=0.2, p50_ttft_s=0.2)
    assert slo.violations(summarize_run(records)) == []


def test_each_broken_bound_is_named():
    records = [streaming(i, 0.0, [1.0, 1.5], done=True) for i in range(4)]
    broken = Slo(p99_tbt_s=0.1, p99_ttft_s=0.5, p50_ttft_s=0.5).violations(summarize_run(records))
    assert [v.split(" ")[:2] for v in broken] == [["P99", "TBT"], ["P99", "TTFT"], ["P50", "TTFT"]]


def test_failed_requests_break_the_slo_unless_allowed():
    records = [streaming(0, 0.0, [0.1], done=True), streaming(1, 0.0, [0.1], done=False)]
    records[1].error = "RESOURCE_EXHAUSTED: queue full"
    summary = summarize_run(records)
    assert Slo().violations(summary) == ["1 requests failed"]
    assert Slo(allow_failures=True).violations(summary) == []


def test_scheduling_delay_bound_is_skipped_when_the_server_does_not_report_it():
    records = [streaming(0, 0.0, [0.1, 0.2], done=True)]
    assert Slo(p50_scheduling_delay_s=2.0).violations(summarize_run(records)) == []


def test_early_fail_waits_while_slow_gaps_fit_the_p99_budget():
    # 2 requests x 100 tokens = 198 gaps; P99 allows 198 - ceil(0.99 * 198) = 1 slow gap.
    rule = EarlyFailRule(Slo(p99_tbt_s=0.5), [100, 100])
    records = [streaming(0, 0.0, [0.1, 1.0], done=False), streaming(1, 0.0, [0.1, 0.2], done=False)]
    assert rule(records, now_s=0.6) is None


def test_early_fail_stops_once_more_gaps_are_slow_than_p99_allows():
    rule = EarlyFailRule(Slo(p99_tbt_s=0.5), [100, 100])
    records = [streaming(0, 0.0, [0.1, 1.0, 2.0], done=False), streaming(1, 0.0, [0.1], done=False)]
    assert "P99 TBT" in rule(records, now_s=2.1)


def test_a_token_overdue_beyond_the_bound_counts_before_it_arrives():
    rule = EarlyFailRule(Slo(p99_tbt_s=0.5), [100, 100])
    records = [streaming(0, 0.0, [0.1, 1.0], done=False), streaming(1, 0.0, [0.1], done=False)]
    assert rule(records, now_s=0.4) is None
    assert "P99 TBT" in rule(records, now_s=2.0)  # request 1 has waited 1.9 s for its second token


def test_early_fail_on_median_ttft_counts_requests_still_waiting():
    rule = EarlyFailRule(Slo(p50_ttft_s=1.0), [4, 4, 4, 4])
    records = [streaming(i, 0.0, [], done=False) for i in range(4)]
    for r in records[2:]:
        r.sent_s = None  # not sent yet: cannot be late
    assert rule(records, now_s=5.0) is None  # 2 late of 4: the median may still make it
    records[2].sent_s = 0.0
    assert "P50 TTFT" in rule(records, now_s=5.0)


def test_a_failed_request_stops_the_probe():
    rule = EarlyFailRule(Slo(), [4])
    record = streaming(0, 0.0, [0.1], done=False)
    record.error = "UNAVAILABLE"
    assert rule([record], now_s=1.0) == "a request failed"

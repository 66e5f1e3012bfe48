"""Report files: JSON without NaN, one CSV row per request, PNGs; the capacity table and files."""

from __future__ import annotations

import csv
import json

from rich.console import Console

from benchmarks.serving.capacity import CapacityResult, Probe
from benchmarks.serving.capacity_report import capacity_table, write_capacity_report
from benchmarks.serving.metrics import summarize_run
from benchmarks.serving.records import RequestRecord
from benchmarks.serving.report import write_run_report
from benchmarks.serving.slo import Slo


def records() -> list[RequestRecord]:
    done = RequestRecord(0, 32, 3, 0.0, sent_s=0.0, chunk_times_s=[0.2, 0.3, 0.5], chunk_num_tokens=[1, 1, 1])
    done.finished_s, done.finish_reason, done.num_completion_tokens = 0.5, "FINISH_REASON_LENGTH", 3
    failed = RequestRecord(1, 32, 3, 0.1, sent_s=0.1, error="UNAVAILABLE: worker gone")
    return [done, failed]


def test_run_report_writes_json_csv_and_two_cdf_pngs(tmp_path):
    recs = records()
    files = write_run_report(tmp_path, "sarathi", recs, summarize_run(recs), {"policy": "sarathi"})
    document = json.loads(
        files.json.read_text(), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c))
    )
    assert document["summary"]["num_failed"] == 1
    assert document["summary"]["scheduling_delay_s"]["p99"] is None  # NaN written as null
    assert document["requests"][0]["chunk_times_s"] == [0.2, 0.3, 0.5]
    rows = list(csv.DictReader(files.csv.open()))
    assert [r["index"] for r in rows] == ["0", "1"]
    assert float(rows[0]["ttft_s"]) == 0.2 and float(rows[0]["max_tbt_s"]) == 0.2
    assert rows[1]["error"] == "UNAVAILABLE: worker gone" and rows[1]["ttft_s"] == ""
    for png in (files.ttft_cdf, files.tbt_cdf):
        assert png.read_bytes()[:4] == b"\x89PNG"


def capacity_results() -> list[CapacityResult]:
    recs = records()[:1]
    summary = summarize_run(recs)
    good = CapacityResult(
        "sarathi",
        2.0,
        [
            Probe(1.0, True, (), summary),
            Probe(2.0, True, (), summary),
            Probe(4.0, False, ("P99 TBT 900 ms > 100 ms",), summary, "stopped"),
        ],
    )
    none = CapacityResult("vllm", 0.0, [Probe(1.0, False, ("P50 TTFT",), summary)])
    return [good, none]


def test_capacity_table_has_a_row_per_policy_with_capacity_and_latencies():
    console = Console(width=200, record=True)
    console.print(capacity_table(capacity_results(), Slo(p99_tbt_s=0.1), "t"))
    text = console.export_text()
    sarathi = next(line for line in text.splitlines() if "sarathi" in line)
    assert "2" in sarathi and "200 ms" in sarathi  # capacity and P99 TBT of the probe at 2 req/s
    assert "none" in next(line for line in text.splitlines() if "vllm" in line)
    assert "P99 TBT <= 100 ms" in text


def test_capacity_report_writes_json_csv_and_png(tmp_path):
    paths = write_capacity_report(tmp_path, capacity_results(), Slo(p99_tbt_s=0.1), {"k": 1})
    document = json.loads(paths["json"].read_text())
    assert [row["capacity_rps"] for row in document["table"]] == [2.0, 0.0]
    assert [p["rate"] for p in document["probes"]["sarathi"]] == [1.0, 2.0, 4.0]
    rows = list(csv.DictReader(paths["csv"].open()))
    assert rows[1]["policy"] == "vllm" and rows[1]["p99_tbt_s"] == ""
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


def test_a_sampled_server_timeline_adds_a_timeline_plot_and_run_totals(tmp_path):
    from benchmarks.serving.server_metrics import MetricsTimeline

    page = {
        "sarathi_requests_running": 1.0,
        "sarathi_requests_waiting": 0.0,
        "sarathi_kv_cache_usage_ratio": 0.1,
        "sarathi_iteration_seconds_count": 5.0,
        "sarathi_iteration_seconds_sum": 0.25,
    }
    later = {**page, "sarathi_iteration_seconds_count": 9.0, "sarathi_iteration_seconds_sum": 0.45}
    timeline = MetricsTimeline("http://x/metrics", [0.0, 0.5], [page, later])
    recs = records()
    files = write_run_report(tmp_path, "t", recs, summarize_run(recs), {}, timeline)
    assert files.timeline is not None and files.timeline.read_bytes()[:4] == b"\x89PNG"
    document = json.loads(files.json.read_text())
    assert document["server_metrics"]["run_totals"]["iterations"] == 4
    assert document["server_metrics"]["timeline"]["sarathi_requests_running"] == [1.0, 1.0]


def test_labels_become_portable_file_names():
    from benchmarks.serving.report import file_stem

    assert file_stem("sarathi:128") == "sarathi_128"
    assert file_stem("vllm @ 1.5 req/s") == "vllm_1.5_req_s"

"""The benchmark against a real `sarathi serve` (separate processes, real gRPC, the embedded
model on the CPU): a short bench writes sensible files, a tiny capacity search prints its table,
and stopping the server leaves none of its processes behind."""

from __future__ import annotations

import csv
import json

import pytest

from benchmarks.serving.cli import main_bench, main_capacity
from benchmarks.serving.server_process import LocalServer, ServerLaunch, group_exists, wait_group_gone


@pytest.fixture(scope="module")
def local_server(tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    launch = ServerLaunch(policy="sarathi", chunk_size=128, extra_args=("--threads", "2"), log_path=log)
    with LocalServer(launch) as server:
        yield server


def test_bench_on_the_embedded_model_writes_sensible_results(local_server, tmp_path):
    argv = ["--address", local_server.address, "--metrics-url", local_server.metrics_url]
    argv += ["--label", "cpu", "--output-dir", str(tmp_path), "--no-progress"]
    argv += ["--num-requests", "6", "--rate", "4", "--lengths", "uniform"]
    argv += ["--prompt-tokens", "16:96", "--output-tokens", "4:12", "--warmup", "1"]
    assert main_bench(argv) == 0
    document = json.loads((tmp_path / "cpu.json").read_text())
    summary = document["summary"]
    assert summary["num_completed"] == 6 and summary["num_failed"] == 0
    assert document["metadata"]["server"]["model"].startswith("SmolLM2")
    for request in document["requests"]:
        assert sum(request["chunk_num_tokens"]) == request["num_output_tokens"]  # ignore_eos held
        assert request["finish_reason"] == "FINISH_REASON_LENGTH"
        assert 0 < request["ttft_s"] <= request["e2e_s"]
    assert 0 < summary["tbt_s"]["p50"] <= summary["tbt_s"]["p99"] <= summary["tbt_s"]["max"]
    assert summary["output_token_throughput"] > 0
    rows = list(csv.DictReader((tmp_path / "cpu_requests.csv").open()))
    assert len(rows) == 6
    # The server's own counters, sampled during the run, saw it work.
    totals = document["server_metrics"]["run_totals"]
    assert totals["generated_tokens"] > 0 and totals["iterations"] > 0 and totals["mean_iteration_s"] > 0
    for name in ("cpu_ttft_cdf.png", "cpu_tbt_cdf.png", "cpu_timeline.png", "cpu_iterations.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    # The scheduler's own trace covers the run: every generated token came from some iteration.
    iterations = json.loads((tmp_path / "cpu_iterations.json").read_text())
    decode_tokens = sum(it["num_decode_tokens"] for it in iterations)
    generated = sum(r["num_output_tokens"] for r in document["requests"])
    assert 0 < decode_tokens <= generated  # each request's first token comes from its prefill
    assert all(it["duration_s"] > 0 for it in iterations)


@pytest.mark.slow   # about 30-50 s: make test stays under 15 minutes on 2 cores
def test_capacity_search_against_a_running_server_prints_the_policy_table(local_server, tmp_path, capsys):
    argv = ["--address", local_server.address, "--policies", "sarathi", "--output-dir", str(tmp_path)]
    argv += ["--num-requests", "6", "--lengths", "fixed", "--prompt-tokens", "32", "--output-tokens", "6"]
    argv += [
        "--slo-p99-tbt",
        "25x",
        "--slo-p50-ttft",
        "5",
        "--max-probes",
        "2",
        "--initial-rate",
        "3",
        "--warmup",
        "1",
        "--no-progress",
    ]
    assert main_capacity(argv) == 0
    out = capsys.readouterr().out
    assert any(line.startswith("│ sarathi") for line in out.splitlines())  # a row of the table
    assert "Capacity" in out
    table = json.loads((tmp_path / "capacity.json").read_text())["table"]
    assert [row["policy"] for row in table] == ["sarathi"]
    assert table[0]["num_probes"] == 2
    assert (tmp_path / "capacity.png").read_bytes()[:4] == b"\x89PNG"


def test_stopping_a_local_server_ends_its_whole_process_group(tmp_path):
    launch = ServerLaunch(chunk_size=64, extra_args=("--threads", "1"), log_path=tmp_path / "s.log")
    with LocalServer(launch) as server:
        pgid = server.process.pid
        assert group_exists(pgid)  # the scheduler and its worker
    # Exited children are reaped by init a moment later, so allow it some seconds.
    assert wait_group_gone(pgid, timeout_s=30)

"""The peer benchmark's parts that need no vLLM and no GPU: how streamed outputs become request
records, the open-loop run against an engine stand-in, the request list both systems get, the
--systems parsing, and the table and JSON."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence

import pytest
from rich.console import Console

from benchmarks.peer.cli import build_plan, parser
from benchmarks.peer.offline import OfflineConfig, offline_specs
from benchmarks.peer.ours_system import server_launch
from benchmarks.peer.report import comparison, peer_document, peer_table, write_peer_report
from benchmarks.peer.results import OfflineResult, SloAnchor, SystemResult
from benchmarks.peer.search import run_search, run_within
from benchmarks.peer.systems import parse_systems, run_order
from benchmarks.peer.vllm_client import apply_stream_output, run_engine_workload, vllm_prompts
from benchmarks.peer.vllm_engine import StreamOutput, VllmOptions, engine_kwargs
from benchmarks.serving.capacity import Probe, SearchParams
from benchmarks.serving.client import ClientOptions, ServerInfo, build_request
from benchmarks.serving.metrics import summarize_run
from benchmarks.serving.records import RequestRecord
from benchmarks.serving.slo import EarlyFailRule, Slo
from benchmarks.serving.workload import RequestSpec, WorkloadConfig, build_workload, probe_workload


def record_from(outputs: Sequence[tuple[float, int, bool]], arrival_s: float = 1.0) -> RequestRecord:
    record = RequestRecord(0, 16, sum(n for _, n, _ in outputs), arrival_s)
    for time_s, num_new, finished in outputs:
        apply_stream_output(record, time_s, StreamOutput(num_new, finished, "length" if finished else None))
    return record


def test_stream_outputs_become_chunks_gaps_and_a_finish():
    record = record_from([(1.25, 1, False), (1.30, 1, False), (1.40, 3, False), (1.45, 1, True)])
    assert record.chunk_times_s == [1.25, 1.30, 1.40, 1.45]
    assert record.chunk_num_tokens == [1, 1, 3, 1]
    assert record.ttft_s == pytest.approx(0.25)  # from the scheduled arrival
    assert record.tbt_gaps_s == pytest.approx([0.05, 0.10, 0.05])  # a merged output is one gap
    assert record.completed and record.finished_s == 1.45 and record.finish_reason == "length"
    assert record.num_completion_tokens == 6


def test_a_final_output_without_tokens_finishes_without_a_gap():
    record = record_from([(2.0, 1, False), (2.1, 1, False), (2.1, 0, True)])
    assert record.chunk_num_tokens == [1, 1] and record.tbt_gaps_s == pytest.approx([0.1])
    assert record.finished_s == 2.1 and record.num_completion_tokens == 2


def test_an_unfinished_stream_is_not_completed():
    record = record_from([(2.0, 1, False)])
    assert not record.completed and record.e2e_s is None


class StandInEngine:
    """Streams max_tokens one token per `step_s`, as an engine at a fixed step time would; it
    stands in for VllmEngine.stream."""

    def __init__(self, step_s: float) -> None:
        self.step_s = step_s
        self.prompts: list[list[int]] = []

    async def stream(self, token_ids: Sequence[int], max_tokens: int) -> AsyncIterator[StreamOutput]:
        self.prompts.append(list(token_ids))
        for i in range(max_tokens):
            await asyncio.sleep(self.step_s)
            yield StreamOutput(1, i == max_tokens - 1, "length" if i == max_tokens - 1 else None)


INFO = ServerInfo("stand-in", 64, 1000, 0, 16, "cpu")


def test_open_loop_run_against_an_engine_records_every_request():
    specs = [RequestSpec(i, 8 + i, 3, 0.02 * i) for i in range(4)]
    engine = StandInEngine(0.01)
    run = asyncio.run(run_engine_workload(engine, specs, INFO, seed=7))  # type: ignore[arg-type]
    assert run.stopped_early is None
    assert [r.index for r in run.records] == [0, 1, 2, 3]
    for record, spec in zip(run.records, specs, strict=True):
        assert record.completed and record.num_received_tokens == 3 and len(record.chunk_times_s) == 3
        assert record.sent_s is not None and record.sent_s >= spec.arrival_s - 1e-3
        assert record.ttft_s is not None and record.ttft_s >= 0.01 - 1e-3
    assert sorted(len(p) for p in engine.prompts) == [8, 9, 10, 11]
    assert summarize_run(run.records).num_failed == 0


def test_an_early_stop_cancels_the_requests_still_streaming():
    specs = [RequestSpec(i, 8, 50, 0.0) for i in range(3)]
    slo = Slo(p99_tbt_s=0.001)  # every gap of a 10 ms step breaks it
    rule = EarlyFailRule(slo, [s.num_output_tokens for s in specs])
    run = asyncio.run(run_engine_workload(StandInEngine(0.01), specs, INFO, 0, None, rule))  # type: ignore[arg-type]
    assert run.stopped_early is not None and "P99 TBT" in run.stopped_early
    assert all(r.error is not None for r in run.records)


def test_vllm_and_ours_get_identical_requests_for_a_seed():
    config = WorkloadConfig(num_requests=8, seed=3, lengths="trace", trace="chat", arrivals="poisson")
    # The probe builds its specs the same way on both sides: same lengths, same arrivals.
    specs = build_workload(probe_workload(config, 4.0, 15.0))
    assert specs == build_workload(probe_workload(config, 4.0, 15.0)) and len(specs) == 60
    vocab = 128256
    ours = [list(build_request(s, vocab, ClientOptions(seed=3)).token_ids.ids) for s in specs]
    assert vllm_prompts(specs, vocab, 3) == ours
    assert vllm_prompts(specs, vocab, 4) != ours


def test_the_offline_workload_is_static_fixed_lengths():
    specs = offline_specs(OfflineConfig(1000, 512, 256))
    assert len(specs) == 1000
    assert {(s.num_prompt_tokens, s.num_output_tokens, s.arrival_s) for s in specs} == {(512, 256, 0.0)}


def test_systems_parse_into_vllm_budgets_and_our_policies():
    systems = parse_systems("vllm:512, vllm:2048,sarathi:512,sarathi:2048@slo,ours:vllm:8192")
    assert [(s.engine, s.label, s.budget) for s in systems] == [
        ("vllm", "vllm:512", 512), ("vllm", "vllm:2048", 2048), ("ours", "sarathi:512", 512),
        ("ours", "sarathi:2048@slo", 2048), ("ours", "ours:vllm:8192", 8192),
    ]
    assert systems[3].policy is not None and systems[3].policy.tbt_slo == "slo"
    assert systems[4].policy is not None and systems[4].policy.name == "vllm"


@pytest.mark.parametrize("text", ["vllm", "vllm:x", "vllm:0", "sarathi:512,sarathi:512", "", "sarathi@fast"])
def test_bad_systems_are_refused(text):
    with pytest.raises(SystemExit):
        parse_systems(text)


def test_vllm_goes_first_only_when_it_measures_the_slo():
    systems = parse_systems("sarathi:512,vllm:2048,sarathi:2048,vllm:512")
    ordered = [s.label for s in run_order(systems, True)]
    assert ordered == ["vllm:2048", "vllm:512", "sarathi:512", "sarathi:2048"]
    assert run_order(systems, False) == systems


def test_engine_arguments_carry_the_budget_and_no_tokenizer(tmp_path):
    kwargs = engine_kwargs(VllmOptions(budget=512), tmp_path)
    assert kwargs["max_num_batched_tokens"] == 512 and kwargs["enable_chunked_prefill"] is True
    assert kwargs["skip_tokenizer_init"] is True and kwargs["load_format"] == "dummy"
    assert kwargs["max_model_len"] == 8192 and kwargs["enable_prefix_caching"] is False
    assert "max_num_seqs" not in engine_kwargs(VllmOptions(budget=512, max_num_seqs=None), tmp_path)


def test_the_plan_follows_the_flags(tmp_path):
    args = parser().parse_args(["--skip-offline", "--max-probes", "2", "--initial-rate", "6"])
    plan = build_plan(args, tmp_path)
    assert plan.offline is None and plan.search is not None and plan.search.max_probes == 2
    assert plan.workload.trace == "chat" and plan.workload.length_scale == 1.0
    assert plan.server_args == ("--device=cuda",)
    assert build_plan(parser().parse_args(["--skip-capacity"]), tmp_path).search is None
    env = build_plan(parser().parse_args(["--server-env", "PYTHONPATH=/a:/b", "--server-env=X="]), tmp_path)
    assert env.server_env == {"PYTHONPATH": "/a:/b", "X": ""}
    with pytest.raises(SystemExit):
        build_plan(parser().parse_args(["--server-env", "PYTHONPATH"]), tmp_path)


def test_our_server_gets_the_same_cap_on_sequences_per_step_as_vllm(tmp_path):
    plan = build_plan(parser().parse_args(["--vllm-max-num-seqs", "192"]), tmp_path)
    entry = parse_systems("sarathi:512")[0]
    args = server_launch(entry, plan, SloAnchor(5.0)).command(1234)
    assert "--max-batch-size=192" in args
    own = build_plan(parser().parse_args(["--server-arg=--max-batch-size=64"]), tmp_path)
    args = server_launch(entry, own, SloAnchor(5.0)).command(1234)
    assert "--max-batch-size=64" in args and "--max-batch-size=256" not in args
    vllm_default = build_plan(parser().parse_args(["--vllm-max-num-seqs", "0"]), tmp_path)
    command = server_launch(entry, vllm_default, SloAnchor(5.0)).command(1)
    assert not any("--max-batch-size" in a for a in command)


def summary_at(tbt_p99_s: float, ttft_p50_s: float, tokens_per_s: float):
    """A RunSummary with these figures, from records built by hand."""
    records = []
    for i in range(4):
        record = RequestRecord(i, 8, 3, 0.0)
        times = [ttft_p50_s, ttft_p50_s + tbt_p99_s, ttft_p50_s + 2 * tbt_p99_s]
        for t in times:
            apply_stream_output(record, t, StreamOutput(1, t == times[-1], None))
        records.append(record)
    summary = summarize_run(records)
    return summary.__class__(**{**summary.__dict__, "output_token_throughput": tokens_per_s})


def results_for_table() -> list[SystemResult]:
    vllm = SystemResult("vllm:512", "vllm", 512, capacity_rate=6.0, startup_s=80.0)
    vllm.probes = [Probe(4.0, True, (), summary_at(0.030, 0.5, 1000.0)),
                   Probe(8.0, False, ("P50 TTFT 3000 ms > 2000 ms",), summary_at(0.04, 3.0, 1500.0)),
                   Probe(6.0, True, (), summary_at(0.035, 0.7, 1300.0))]
    vllm.offline = OfflineResult(1000, 512, 256, 0, 26.2, 9773.0)
    ours = SystemResult("sarathi:512", "ours", 512, capacity_rate=9.0,
                        error="stopped at its time limit (240 s)")
    ours.probes = [Probe(9.0, True, (), summary_at(0.030, 0.4, 2000.0))]
    ours.offline = OfflineResult(1000, 512, 256, 0, 32.0, 7962.0)
    return [vllm, ours, SystemResult("vllm:2048", "vllm", 2048, error="RuntimeError: no GPU")]


def test_the_table_shows_each_probe_and_the_comparison():
    anchor = SloAnchor(5.0, decode_step_s=0.00916, measured_by="vllm:512")
    slo = Slo(p99_tbt_s=anchor.p99_tbt_s, p50_ttft_s=2.0)
    console = Console(width=200, record=True)
    console.print(peer_table(results_for_table(), anchor, slo, "peer"))
    text = console.export_text()
    assert "45.8 ms" in text and "9.16 ms" in text  # the bound and the step it came from
    cells = ("vllm:512", "sarathi:512", "1,300", "9,773", "7,962", "35.0 ms", "0.70 s", "fail", "incomplete")
    for cell in cells:
        assert cell in text
    assert "capacity: ours sarathi:512 9 req/s / vLLM vllm:512 6 req/s = 1.50x" in text
    assert "offline: ours sarathi:512 7,962 output tok/s / vLLM vllm:512 9,773 output tok/s = 0.81x" in text


def test_the_json_holds_every_system_and_probe(tmp_path):
    results = results_for_table()
    anchor = SloAnchor(5.0, given_p99_tbt_s=0.0458)
    paths = write_peer_report(tmp_path, results, anchor, Slo(p99_tbt_s=0.0458), {"command": ["x"]})
    assert [p.name for p in paths] == ["peer.json", "peer.png"] and paths[1].stat().st_size > 0
    document = json.loads(paths[0].read_text())
    expected = peer_document(results, anchor, Slo(p99_tbt_s=0.0458), {"command": ["x"]})
    assert document == json.loads(json.dumps(expected))
    rows = {row["system"]: row for row in document["systems"]}
    assert rows["vllm:512"]["capacity_rps"] == 6.0 and len(rows["vllm:512"]["probes"]) == 3
    assert rows["vllm:512"]["output_tokens_per_s_at_capacity"] == 1300.0
    assert rows["vllm:512"]["offline"]["output_tokens_per_s"] == 9773.0
    assert rows["vllm:2048"]["error"].startswith("RuntimeError")
    assert document["anchor"]["p99_tbt_s"] == 0.0458
    assert document["comparison"]["capacity"]["ratio"] == pytest.approx(1.5)
    assert comparison(results)["offline"]["ratio"] == pytest.approx(7962 / 9773)


def png_width(path) -> int:
    return int.from_bytes(path.read_bytes()[16:20], "big")   # IHDR's width


def test_the_plot_has_a_panel_only_for_what_was_measured(tmp_path):
    """Capacity and probes (two panels), offline throughput (one): a run that skipped offline
    draws no empty offline panel, one that skipped capacity no empty capacity panels."""
    anchor, slo = SloAnchor(5.0, given_p99_tbt_s=0.0458), Slo(p99_tbt_s=0.0458)
    widths = {}
    for name, drop in (("both", ()), ("capacity", ("offline",)), ("offline", ("probes",))):
        results = results_for_table()
        for r in results:
            for field in drop:
                setattr(r, field, None if field == "offline" else [])
        (tmp_path / name).mkdir()
        _, png = write_peer_report(tmp_path / name, results, anchor, slo, {})
        widths[name] = png_width(png)
    assert widths["both"] == 3 * widths["offline"] and widths["capacity"] == 2 * widths["offline"]


def test_a_time_limit_keeps_the_probes_measured_so_far():
    result = SystemResult("slow", "ours", 512)

    async def probe(rate: float) -> Probe:
        if rate > 2.0:
            await asyncio.sleep(10)
        return Probe(rate, True, ())

    async def work() -> None:
        await run_search(result, probe, SearchParams(initial_rate=1.0, max_probes=5))

    asyncio.run(run_within(0.5, work(), result, Console(quiet=True)))
    assert [p.rate for p in result.probes] == [1.0, 2.0]
    assert result.capacity_rate == 2.0 and result.error is not None and "time limit" in result.error


def test_an_error_ends_one_system_only():
    result = SystemResult("broken", "vllm", 512)

    async def work() -> None:
        raise RuntimeError("engine died\nlong trace")

    asyncio.run(run_within(5.0, work(), result, Console(quiet=True)))
    assert result.error == "RuntimeError: engine died" and result.capacity_rate is None

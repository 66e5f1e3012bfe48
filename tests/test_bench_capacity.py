"""The capacity search, against probes whose outcome is a known function of the rate."""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.serving.capacity import Probe, SearchParams, search_capacity


def search(threshold: float, params: SearchParams):
    """A server that meets the SLO at any rate up to `threshold`."""
    probed: list[float] = []

    async def probe(rate: float) -> Probe:
        probed.append(rate)
        passed = rate <= threshold
        return Probe(rate, passed, () if passed else ("too slow",))

    return asyncio.run(search_capacity("p", probe, params)), probed


@given(st.floats(min_value=0.05, max_value=500))
@settings(max_examples=50, deadline=None)
def test_capacity_is_a_passing_rate_within_tolerance_of_the_threshold(threshold):
    params = SearchParams(initial_rate=1.0, min_rate=0.01, max_probes=30, rel_tol=0.05)
    result, probed = search(threshold, params)
    assert result.capacity_rate <= threshold
    assert result.capacity_rate >= threshold / 1.05 - 1e-9
    assert result.at_capacity is not None and result.at_capacity.rate == result.capacity_rate


def test_search_never_exceeds_its_probe_budget():
    result, probed = search(37.0, SearchParams(initial_rate=1.0, max_probes=5, rel_tol=1e-6))
    assert len(probed) == len(result.probes) == 5
    assert result.capacity_rate == 16.0  # the doubling 1, 2, 4, 8, 16 used the budget up


def test_no_capacity_when_even_the_lowest_rate_fails():
    result, probed = search(0.001, SearchParams(initial_rate=1.0, min_rate=0.1, max_probes=20))
    assert result.capacity_rate == 0.0 and result.at_capacity is None
    assert min(probed) == 0.1


def test_search_stops_at_max_rate_when_everything_passes():
    result, probed = search(1e9, SearchParams(initial_rate=1.0, max_rate=8.0, max_probes=20))
    assert result.capacity_rate == 8.0 and probed == [1.0, 2.0, 4.0, 8.0]


def test_bad_search_parameters_are_refused():
    with pytest.raises(ValueError):
        SearchParams(initial_rate=0.0)
    with pytest.raises(ValueError):
        SearchParams(max_probes=0)


def test_a_policy_the_scheduler_lacks_is_reported_not_measured_without_a_server(tmp_path, capsys):
    from benchmarks.serving.cli import main_capacity

    argv = ["--policies", "no-such-policy", "--output-dir", str(tmp_path), "--no-progress"]
    assert main_capacity(argv) == 0
    (row,) = json.loads((tmp_path / "capacity.json").read_text())["table"]
    assert row["capacity_rps"] == 0.0 and "unknown policy" in row["error"]
    assert "not measured" in capsys.readouterr().out


def test_each_policy_may_carry_its_own_token_budget():
    from benchmarks.serving.cli import parse_policies

    assert parse_policies("sarathi:128, vllm:2048,orca") == [("sarathi", 128, None), ("vllm", 2048, None),
                                                             ("orca", None, None)]


def test_a_sarathi_entry_may_carry_an_slo_driven_budget():
    from benchmarks.serving.cli import parse_policies
    from benchmarks.serving.server_process import ServerLaunch

    auto, fixed = parse_policies("sarathi:2048@slo,sarathi@slo=45.8")
    assert (auto.chunk_size, auto.tbt_slo, auto.label) == (2048, "slo", "sarathi:2048@slo")
    assert (fixed.chunk_size, fixed.tbt_slo) == (None, "slo=45.8")
    command = ServerLaunch(policy="sarathi", chunk_size=2048, tbt_slo_ms=45.8).command(1234)
    assert command[-4:] == ["--chunk-size", "2048", "--tbt-slo-ms", "45.8"]


def test_capacity_states_the_lengths_it_will_send_and_how_to_get_the_trace_s_own():
    from benchmarks.serving.cli import capacity_parser, describe_workload
    from benchmarks.serving.cli_common import workload_config

    scaled = describe_workload(workload_config(capacity_parser().parse_args([])))
    assert "chat x 0.03125" in scaled and "--length-scale 1" in scaled
    full = describe_workload(workload_config(capacity_parser().parse_args(["--length-scale", "1"])))
    assert "--length-scale" not in full
    assert int(full.split("prompt median ")[1].split()[0]) > 1000   # the trace's own: 1,730-ish

"""Workloads: seeded and reproducible, lengths within their distributions, arrivals at the rate."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.serving.traces import make_traces
from benchmarks.serving.workload import (
    SHIPPED_TRACES,
    WorkloadConfig,
    build_workload,
    load_trace,
    with_rate,
)


def lengths(specs):
    return [(s.num_prompt_tokens, s.num_output_tokens) for s in specs]


def test_same_config_and_seed_give_the_same_workload():
    config = WorkloadConfig(num_requests=50, lengths="uniform", prompt_tokens=(8, 64), output_tokens=(4, 16))
    assert build_workload(config) == build_workload(config)


def test_another_seed_gives_another_workload():
    config = WorkloadConfig(num_requests=50, lengths="uniform", prompt_tokens=(8, 64), output_tokens=(4, 16))
    other = WorkloadConfig(**{**config.__dict__, "seed": 1})
    assert lengths(build_workload(config)) != lengths(build_workload(other))


def test_changing_the_rate_keeps_every_length():
    """A capacity search must probe every rate with the same requests."""
    config = WorkloadConfig(num_requests=40, trace="chat", lengths="trace", rate=1.0)
    slow, fast = build_workload(config), build_workload(with_rate(config, 8.0))
    assert lengths(slow) == lengths(fast)
    assert fast[-1].arrival_s < slow[-1].arrival_s


def test_fixed_lengths_use_the_low_end():
    specs = build_workload(WorkloadConfig(num_requests=3, prompt_tokens=(100, 100), output_tokens=(7, 7)))
    assert lengths(specs) == [(100, 7)] * 3


@given(st.integers(1, 500), st.integers(0, 500), st.sampled_from(["uniform", "zipf"]), st.integers(0, 10**6))
@settings(max_examples=30, deadline=None)
def test_uniform_and_zipf_lengths_stay_in_their_range(low, width, kind, seed):
    config = WorkloadConfig(
        num_requests=20,
        seed=seed,
        lengths=kind,
        prompt_tokens=(low, low + width),
        output_tokens=(1, width + 1),
    )
    for spec in build_workload(config):
        assert low <= spec.num_prompt_tokens <= low + width
        assert 1 <= spec.num_output_tokens <= width + 1


def test_zipf_makes_short_requests_more_common_than_long():
    config = WorkloadConfig(num_requests=2000, lengths="zipf", prompt_tokens=(10, 1000), zipf_theta=1.2)
    prompts = np.array([s.num_prompt_tokens for s in build_workload(config)])
    assert (prompts < 100).sum() > (prompts >= 900).sum() * 5


def test_poisson_arrivals_start_at_zero_and_average_the_rate():
    specs = build_workload(WorkloadConfig(num_requests=5000, arrivals="poisson", rate=4.0))
    arrivals = np.array([s.arrival_s for s in specs])
    assert arrivals[0] == 0.0 and np.all(np.diff(arrivals) >= 0)
    assert np.diff(arrivals).mean() == pytest.approx(0.25, rel=0.05)


def test_gamma_arrivals_have_the_requested_burstiness():
    specs = build_workload(WorkloadConfig(num_requests=5000, arrivals="gamma", rate=4.0, burstiness_cv=3.0))
    gaps = np.diff([s.arrival_s for s in specs])
    assert gaps.mean() == pytest.approx(0.25, rel=0.15)
    assert gaps.std() / gaps.mean() == pytest.approx(3.0, rel=0.15)


def test_static_arrivals_send_everything_at_once():
    specs = build_workload(WorkloadConfig(num_requests=10, arrivals="static"))
    assert {s.arrival_s for s in specs} == {0.0}


def test_csv_and_jsonl_traces_read_the_same(tmp_path):
    rows = [(10, 5, 0.0), (20, 6, 0.5), (30, 7, 2.0)]
    csv_path = tmp_path / "t.csv"
    csv_path.write_text(
        "num_prompt_tokens,num_output_tokens,arrival_s\n" + "".join(f"{p},{o},{a}\n" for p, o, a in rows)
    )
    jsonl_path = tmp_path / "t.jsonl"
    jsonl_path.write_text(
        "".join(
            json.dumps({"prompt_tokens": p, "output_tokens": o, "arrival_s": a}) + "\n" for p, o, a in rows
        )
    )
    assert load_trace(csv_path) == load_trace(jsonl_path)


def test_trace_arrivals_follow_the_timestamps_scaled_and_in_order(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(
        "".join(
            json.dumps({"num_prompt_tokens": 10 * i + 1, "num_output_tokens": 3, "arrival_s": 5 + i}) + "\n"
            for i in range(4)
        )
    )
    config = WorkloadConfig(
        num_requests=4, lengths="trace", arrivals="trace", trace=str(path), time_scale=0.5
    )
    specs = build_workload(config)
    assert [s.arrival_s for s in specs] == [0.0, 0.5, 1.0, 1.5]
    assert [s.num_prompt_tokens for s in specs] == [1, 11, 21, 31]


def test_trace_without_timestamps_cannot_drive_arrivals(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("num_prompt_tokens,num_output_tokens\n10,5\n")
    with pytest.raises(ValueError, match="arrival_s"):
        build_workload(WorkloadConfig(num_requests=2, lengths="trace", arrivals="trace", trace=str(path)))


def test_length_scale_and_caps_apply_to_trace_lengths():
    base = WorkloadConfig(num_requests=100, lengths="trace", trace="arxiv")
    scaled = WorkloadConfig(**{**base.__dict__, "length_scale": 0.1, "max_prompt_tokens": 900})
    for full, small in zip(build_workload(base), build_workload(scaled), strict=True):
        assert small.num_prompt_tokens == min(900, max(1, round(full.num_prompt_tokens * 0.1)))
        assert small.num_output_tokens == max(1, round(full.num_output_tokens * 0.1))


@pytest.mark.parametrize(
    ("name", "prompt_median", "prompt_p90", "output_median", "max_total"),
    [("chat", 1730, 5696, 415, 8192), ("arxiv", 7059, 12985, 208, 16384)],
)
def test_shipped_traces_have_the_papers_length_statistics(
    name, prompt_median, prompt_p90, output_median, max_total
):
    rows = load_trace(SHIPPED_TRACES[name])
    prompts = np.array([r.num_prompt_tokens for r in rows])
    outputs = np.array([r.num_output_tokens for r in rows])
    assert np.median(prompts) == pytest.approx(prompt_median, rel=0.03)
    assert np.percentile(prompts, 90) == pytest.approx(prompt_p90, rel=0.03)
    assert np.median(outputs) == pytest.approx(output_median, rel=0.03)
    assert (prompts + outputs).max() <= max_total


def test_shipped_traces_are_what_the_script_writes(tmp_path):
    for path in make_traces.main(tmp_path):
        assert path.read_bytes() == SHIPPED_TRACES[path.stem].read_bytes()


def test_bad_configs_are_refused():
    with pytest.raises(ValueError):
        WorkloadConfig(lengths="trace")  # no trace file
    with pytest.raises(ValueError):
        WorkloadConfig(prompt_tokens=(10, 5))
    with pytest.raises(ValueError):
        WorkloadConfig(arrivals="poisson", rate=0)


def test_a_fast_probe_sends_enough_requests_to_span_its_minimum_duration():
    from benchmarks.serving.workload import WorkloadConfig, build_workload, probe_workload

    base = WorkloadConfig(num_requests=32, lengths="fixed", prompt_tokens=(8, 8), output_tokens=(4, 4))
    assert probe_workload(base, 2.0, 10.0).num_requests == 32     # 20 would be fewer: keep 32
    fast = probe_workload(base, 64.0, 10.0)
    assert fast.num_requests == 640 and fast.rate == 64.0
    arrivals = [s.arrival_s for s in build_workload(fast)]
    assert arrivals[-1] > 8.0   # Poisson at 64 req/s over 640 requests: about 10 s of arrivals
    assert probe_workload(base, 64.0, 0.0).num_requests == 32     # off by default

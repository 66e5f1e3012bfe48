"""The offline replay: a step-cost model fitted to an iteration trace, and the offline workload
through the real scheduler costed by it, as a table per budget and sequences per step."""

from __future__ import annotations

import json
import random

import pytest

from benchmarks.serving.offline_replay import StepCost, fit_step_cost, main, replay

TRUE = StepCost(base_ms=4.7, per_decode_ms=0.034, per_prefill_token_ms=0.0242, prefill_step_ms=-1.8)


def trace_rows(cost: StepCost, n: int = 300, noise_ms: float = 0.05) -> list[dict]:
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        prefill = rng.choice([0, 0, rng.randrange(1, 2049)])
        decodes = rng.randrange(0, 257)
        rows.append({"num_prefill_tokens": prefill, "num_decode_tokens": decodes,
                     "worker_device_ms": cost.ms(prefill, decodes) + rng.gauss(0, noise_ms)})
    rows.append({"num_prefill_tokens": 0, "num_decode_tokens": 0, "worker_device_ms": 99.0})  # idle
    return rows


def test_the_fit_recovers_the_step_cost_a_trace_was_made_with():
    fitted = fit_step_cost(trace_rows(TRUE))
    assert fitted.base_ms == pytest.approx(TRUE.base_ms, abs=0.05)
    assert fitted.per_decode_ms == pytest.approx(TRUE.per_decode_ms, rel=0.05)
    assert fitted.per_prefill_token_ms == pytest.approx(TRUE.per_prefill_token_ms, rel=0.02)
    assert fitted.prefill_step_ms == pytest.approx(TRUE.prefill_step_ms, abs=0.1)


def test_a_trace_too_short_to_fit_is_refused():
    with pytest.raises(ValueError, match="too few"):
        fit_step_cost(trace_rows(TRUE, n=3))


def test_the_replay_generates_every_token_and_costs_every_iteration():
    r = replay(TRUE, budget=512, max_seqs=16, requests=20, prompt=100, output=10)
    assert r.output_tokens == 200
    # 2000 prompt tokens need at least 4 steps of 512; 10 tokens each need 10 steps apiece.
    assert r.with_prefill >= 4 and r.iterations >= 10
    assert r.seconds >= r.iterations * (TRUE.base_ms + TRUE.prefill_step_ms) / 1e3


def test_more_sequences_per_step_take_fewer_iterations():
    few = replay(TRUE, budget=2048, max_seqs=32, requests=128, prompt=64, output=32)
    many = replay(TRUE, budget=2048, max_seqs=128, requests=128, prompt=64, output=32)
    assert many.iterations < few.iterations and many.seconds < few.seconds


def test_the_command_fits_a_trace_file_and_prints_one_row_per_setting(tmp_path, capsys):
    trace = tmp_path / "run_iterations.json"
    trace.write_text(json.dumps(trace_rows(TRUE)))
    main(["--trace", str(trace), "--budgets", "256,512", "--max-seqs", "8", "--requests", "16",
          "--prompt", "40", "--output", "8"])
    out = capsys.readouterr().out
    assert "step cost (ms) = 4.7" in out
    assert [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| 2") or
            line.startswith("| 5")] == ["256", "512"]

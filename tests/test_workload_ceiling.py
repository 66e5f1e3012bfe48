"""benchmarks.peer.ceiling: a workload's kernel-by-kernel ceiling is the sum of the step floors
gpu_bench measures against (one prefill, then one-token decodes at growing context)."""

from __future__ import annotations

import pytest

from benchmarks.peer.ceiling import ceiling, main, model_config, request_work
from benchmarks.step.floors import hybrid_flops, kv_bytes, prefill_flops

MM, BW = 700e12, 4.2e12


@pytest.fixture(scope="module")
def llama8b():
    return model_config("llama3-8b")


def test_a_one_token_answer_costs_its_prefill_and_reads_no_kv(llama8b):
    work = request_work(llama8b, 512, 1)
    assert work.flops == pytest.approx(prefill_flops(llama8b, 512))
    assert work.kv_read_bytes == 0


def test_each_further_token_costs_one_decode_at_its_context(llama8b):
    p, o = 300, 7
    work = request_work(llama8b, p, o)
    decodes = [p + i for i in range(1, o)]
    expected = prefill_flops(llama8b, p) + sum(hybrid_flops(llama8b, 0, 1, c) for c in decodes)
    assert work.flops == pytest.approx(expected)
    assert work.kv_read_bytes == pytest.approx(sum(kv_bytes(llama8b, c) for c in decodes))


def test_overlapping_kv_reads_with_matmuls_never_lowers_the_rate_below_sequential(llama8b):
    c = ceiling(llama8b, "mixed", [(2000, 500), (100, 20), (8000, 1)], MM, BW)
    assert c.overlapped_rps >= c.sequential_rps
    assert c.requests == 3 and c.mean_output_tokens == pytest.approx(521 / 3)


def test_ceiling_prints_the_chat_trace_and_offline_rows(capsys):
    main(["--offline", "10x64x8"])
    out = capsys.readouterr().out
    assert "trace chat" in out and "offline 10 x (64, 8)" in out and "req/s" in out

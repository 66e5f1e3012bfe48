"""Overlapped scheduling (plan N+1 sent while the worker runs plan N) changes no token."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import collect, greedy_request, hf_greedy

from protos import generation_pb2 as pb

LENGTHS = [5, 40, 130, 300]


@pytest.mark.slow   # ~20 s; make test's exactness runs (overlap on) keep the suite under 15 minutes
def test_greedy_tokens_are_exact_with_overlap_off(server_factory, hf_model, long_token_ids):
    server = server_factory("--chunk-size", "32", "--no-overlap")
    prompts = [long_token_ids[11 * i: 11 * i + n] for i, n in enumerate(LENGTHS)]
    stub = server.stub()
    with ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(lambda p: collect(stub.Generate(greedy_request(p, 24)))[0], prompts))
    assert got == [hf_greedy(hf_model, p, 24) for p in prompts]


def test_a_stop_token_found_one_step_late_streams_nothing_past_it(default_server, hf_model):
    # With overlap the scheduler learns of the stop token after it already sent the next plan:
    # the extra token the worker samples must be dropped, never streamed.
    stub = default_server.stub()
    free, _, _ = collect(stub.Generate(pb.GenerateRequest(
        text="Repeat after me: yes yes yes", sampling=pb.SamplingParams(
            max_tokens=10, temperature=0.0, ignore_eos=True))))
    stop_id = free[2]
    got, _, finished = collect(stub.Generate(pb.GenerateRequest(
        text="Repeat after me: yes yes yes", sampling=pb.SamplingParams(
            max_tokens=10, temperature=0.0, ignore_eos=True, stop_token_ids=[stop_id]))))
    assert got == free[:free.index(stop_id) + 1]
    assert finished.reason == pb.FINISH_REASON_STOP
    assert finished.usage.completion_tokens == len(got)

"""The scheduler keeps a pipeline full: with PP=2 it sends two micro-batches of disjoint
sequences before waiting for the first, and the tokens stay those of one worker."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

from conftest import collect, greedy_request, start_server

from protos import generation_pb2 as pb

TINY = ("--model", "dummy:tiny", "--weights-seed", "7", "--chunk-size", "64", "--threads", "1")


def generate_all(server, prompts: list[list[int]]) -> list[list[int]]:
    stub = server.stub()
    with ThreadPoolExecutor(len(prompts)) as pool:
        return [r[0] for r in pool.map(lambda p: collect(stub.Generate(greedy_request(p, 12), timeout=240)),
                                       prompts)]


def test_pipeline_of_two_stages_runs_two_disjoint_micro_batches_with_exact_tokens():
    rng = random.Random(3)
    prompts = [[rng.randrange(1, 512) for _ in range(n)] for n in (8, 20, 40, 70, 9, 33, 50, 90)]
    single = start_server(*TINY, timeout=240)
    try:
        expected = generate_all(single, prompts)
    finally:
        single.stop()
    server = start_server(*TINY, "--pipeline-parallel-size", "2", timeout=240)
    try:
        got = generate_all(server, prompts)
        trace = list(server.operator().GetTrace(pb.GetTraceRequest()).iterations)
    finally:
        server.stop()
    assert got == expected
    overlapping = 0
    for a, b in zip(trace, trace[1:], strict=False):
        if b.start_s < a.start_s + a.duration_s:  # b was sent before a's result came back
            overlapping += 1
            shared = set(a.decode_seq_ids) | set(a.prefill_seq_ids)
            assert not shared & (set(b.decode_seq_ids) | set(b.prefill_seq_ids)), \
                f"steps {a.step_id} and {b.step_id} share a sequence"
    print(f"{overlapping} of {len(trace)} steps overlapped")
    assert overlapping >= len(trace) // 3, f"only {overlapping} of {len(trace)} steps overlapped"

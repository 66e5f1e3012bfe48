"""The per-iteration trace, read over the Operator API of a real server."""

from __future__ import annotations

import threading

from conftest import collect, greedy_request

from protos import generation_pb2 as pb


def test_trace_shows_decodes_never_stall_while_a_long_prompt_prefills(default_server, long_token_ids):
    stub = default_server.stub()
    operator = default_server.operator()
    before = operator.GetTrace(pb.GetTraceRequest()).iterations
    last_step = before[-1].step_id if before else 0
    shorts = [stub.Generate(greedy_request(long_token_ids[i:i + 10], 60)) for i in range(3)]
    for s in shorts:
        next(s), next(s)  # each is decoding now
    tokens, _, _ = collect(stub.Generate(greedy_request(long_token_ids[:600], 2)))
    threads = [threading.Thread(target=collect, args=(s,)) for s in shorts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    trace = [it for it in operator.GetTrace(pb.GetTraceRequest()).iterations if it.step_id > last_step]
    # The long prompt is the request prefilled in the most iterations.
    prefills = [seq for it in trace for seq in it.prefill_seq_ids]
    long_id = max(set(prefills), key=prefills.count)
    long_steps = [it for it in trace if long_id in it.prefill_seq_ids]
    assert len(long_steps) >= 600 // 64
    first = trace.index(long_steps[0])
    decoding = set(trace[first - 1].decode_seq_ids)
    assert len(decoding) == 3
    for it in long_steps:
        assert decoding <= set(it.decode_seq_ids), f"a decode stalled in step {it.step_id}"
        assert it.num_prefill_tokens + it.num_decode_tokens <= 64
    assert len(tokens) == 2


def test_iteration_rows_count_each_stream_left_out_between_two_of_its_tokens():
    from benchmarks.serving.iteration_trace import decodes_skipped

    # Sequence 1 misses iteration 1, sequence 2 misses 1 and 2; 3 stops (finished), not skipped.
    assert decodes_skipped([[1, 2, 3], [3], [1], [1, 2]]) == [0, 2, 1, 0]

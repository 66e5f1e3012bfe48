"""A pipeline of P stages keeps P micro-batches of disjoint sequences in flight: each takes
at most its share of the running sequences, so the next always has sequences to run."""

from __future__ import annotations

from collections import deque

from hypothesis import given, settings
from hypothesis import strategies as st
from scheduler_sim import make_request, make_scheduler, simulated_output


def run_pipelined(sched, stages: int, limit: int = 5000):
    """Keeps up to `stages` plans in flight, as the engine does for a pipeline; applies the
    oldest result when full. Returns every plan's sequence ids, in send order."""
    in_flight: deque = deque()
    sent: list[set[int]] = []
    for _ in range(limit):
        if not sched.has_work() and not in_flight:
            return sent
        if sched.has_work() and len(in_flight) < stages:
            busy = frozenset(s for p in in_flight for s in p.seq_ids)
            plan = sched.schedule(busy, stages)
            if not plan.is_empty:
                ids = set(plan.seq_ids)
                assert not ids & busy, "a sequence is in two micro-batches at once"
                in_flight.append(plan)
                sent.append(ids)
                continue
        sched.update(simulated_output(sched, in_flight.popleft()))
    raise AssertionError("the pipeline did not finish")


def test_two_stages_split_eight_decoding_sequences_into_two_micro_batches_of_four():
    sched = make_scheduler(token_budget=512)
    for i in range(8):
        sched.add(make_request(i, 10, 6))
    sent = run_pipelined(sched, stages=2)
    steady = sent[2:-2]  # past admission, before the last sequences finish
    assert steady and all(len(ids) == 4 for ids in steady), [len(ids) for ids in sent]
    for a, b in zip(steady, steady[1:], strict=False):
        assert not a & b


@settings(max_examples=40, deadline=None)
@given(stages=st.integers(2, 4),
       lengths=st.lists(st.tuples(st.integers(1, 90), st.integers(1, 12)), min_size=1, max_size=12))
def test_every_request_finishes_with_all_its_tokens_through_a_pipeline(stages, lengths):
    sched = make_scheduler(token_budget=64, num_blocks=200)
    for i, (prompt, out) in enumerate(lengths):
        sched.add(make_request(i, prompt, out))
    requests = dict(sched.requests)
    run_pipelined(sched, stages)
    assert not sched.requests
    for i, (_, out) in enumerate(lengths):
        assert len(requests[i].output_token_ids) == out

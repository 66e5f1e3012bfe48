"""Sarathi's defining behaviour, read off the scheduler's per-iteration plans."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from scheduler_sim import make_request, make_scheduler, step


def test_running_decodes_get_a_token_every_iteration_while_a_long_prompt_prefills():
    sched = make_scheduler(token_budget=64)
    for i in range(4):
        sched.add(make_request(i, prompt_len=8, max_tokens=200))
    while not all(r.is_decoding for r in sched.requests.values()):
        step(sched)
    sched.add(make_request(99, prompt_len=600, max_tokens=4))
    long = sched.requests[99]
    prefill_iterations = 0
    while long.num_computed_tokens < 600:
        plan, _ = step(sched)
        prefill_iterations += 1
        scheduled = dict(zip(plan.seq_ids, plan.num_scheduled_tokens, strict=True))
        assert all(scheduled.get(i) == 1 for i in range(4)), f"a decode stalled in step {plan.step_id}"
        assert plan.num_tokens <= 64
        assert scheduled[99] == min(60, 600 - plan.num_computed_tokens[plan.seq_ids.index(99)])
    assert prefill_iterations == 10  # 600 tokens in chunks of 60 beside 4 decodes


def test_prompts_are_split_into_chunks_of_the_token_budget():
    sched = make_scheduler(token_budget=16)
    sched.add(make_request(1, prompt_len=50, max_tokens=1))
    chunks = []
    while sched.has_work():
        plan, _ = step(sched)
        chunks += plan.num_scheduled_tokens
    assert chunks == [16, 16, 16, 2]


def test_newest_request_is_preempted_when_blocks_run_out_and_everything_finishes():
    # 6 blocks of 4 tokens: three requests of 8 + 8 tokens cannot all stay resident.
    sched = make_scheduler(num_blocks=6, block_size=4, token_budget=32)
    for i in range(3):
        sched.add(make_request(i, prompt_len=8, max_tokens=8))
    preempted = []
    finished = set()
    for _ in range(200):
        if not sched.has_work():
            break
        plan, updates = step(sched)
        preempted += plan.dropped_seq_ids
        finished |= {u.seq_id for u in updates if u.finish_reason is not None}
    assert finished == {0, 1, 2}
    assert preempted and preempted[0] == 2  # the most recently admitted goes first
    assert sched.blocks.num_free_blocks == 6


def test_preempted_request_returns_as_a_new_sequence_with_its_generated_tokens():
    sched = make_scheduler(num_blocks=4, block_size=4, token_budget=32)
    sched.add(make_request(0, prompt_len=6, max_tokens=9))
    sched.add(make_request(1, prompt_len=6, max_tokens=9))
    for _ in range(100):
        plan, _ = step(sched)
        readmitted = [s for s in plan.new_sequences if s.num_prompt_tokens < len(s.token_ids)]
        if readmitted:
            seq = readmitted[0]
            assert seq.token_ids[:6] == [7] * 6 and set(seq.token_ids[6:]) == {3}
            return
    raise AssertionError("no request was preempted and readmitted")


@settings(max_examples=60, deadline=None)
@given(
    block_size=st.sampled_from([1, 2, 4, 16]),
    extra_blocks=st.integers(0, 30),
    budget=st.integers(1, 96),
    max_batch=st.integers(1, 8),
    requests=st.lists(st.tuples(st.integers(1, 60), st.integers(1, 20), st.integers(0, 30)),
                      min_size=1, max_size=12),
    aborts=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 11)), max_size=4),
)
def test_random_workloads_keep_blocks_consistent_and_always_finish(block_size, extra_blocks, budget,
                                                                  max_batch, requests, aborts):
    longest = max(p + m for p, m, _ in requests)
    num_blocks = -(-longest // block_size) + extra_blocks  # the largest request fits alone
    sched = make_scheduler(num_blocks=num_blocks, block_size=block_size, token_budget=budget,
                           max_batch_size=min(max_batch, budget))
    pending = sorted((arrive, i, p, m) for i, (p, m, arrive) in enumerate(requests))
    aborted: set[int] = set()
    finished: set[int] = set()
    for it in range(5000):
        while pending and pending[0][0] <= it:
            _, i, p, m = pending.pop(0)
            sched.add(make_request(i, prompt_len=p, max_tokens=m))
        for when, victim in aborts:
            if when == it and sched.abort(victim):
                aborted.add(victim)
        if not sched.has_work() and not pending:
            break
        plan, updates = step(sched)
        finished |= {u.seq_id for u in updates if u.finish_reason is not None}
        # Invariants after every iteration.
        assert plan.num_tokens <= budget
        assert len(plan.seq_ids) <= min(max_batch, budget)
        assert len(set(plan.seq_ids)) == len(plan.seq_ids)
        owned = [b for t in sched.blocks.tables.values() for b in t]
        assert len(owned) == len(set(owned)), "a block is owned twice"
        assert len(owned) + sched.blocks.num_free_blocks == num_blocks, "a block leaked"
        assert set(sched.blocks.tables) <= set(sched.requests)
        for req in sched.state.running:
            assert len(sched.blocks.tables.get(req.seq_id, ())) * block_size >= req.num_computed_tokens
    assert not pending and not sched.has_work(), "the scheduler stopped making progress"
    assert finished | aborted == set(range(len(requests)))
    assert sched.blocks.num_free_blocks == num_blocks

"""Random arrivals, lengths, priorities, aborts and tiny caches through the real scheduler and
block manager, for every policy, with and without prefix caching; invariants after every step."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scheduler_sim import make_request, make_scheduler, simulated_output, step

from scheduler_service.policies import POLICIES
from scheduler_service.prefix_caching import PrefixCachingBlockManager

WHOLE_PROMPT_POLICIES = {"vllm", "orca", "faster_transformer"}


def assert_blocks_consistent(sched) -> None:
    blocks = sched.blocks
    tables = blocks.tables
    refs = Counter(b for t in tables.values() for b in t)
    for seq_id, table in tables.items():
        assert len(table) == len(set(table)), f"sequence {seq_id} holds a block twice"
    free, evictable = blocks.free_block_ids(), blocks.evictable_block_ids()
    pools = free + evictable + list(refs)
    assert sorted(pools) == list(range(blocks.num_blocks)), "a block leaked or is in two places"
    for b in range(blocks.num_blocks):
        assert blocks.ref_count(b) == refs.get(b, 0), f"block {b}: ref count disagrees with tables"
    if not isinstance(blocks, PrefixCachingBlockManager):  # only cached blocks may be shared
        assert all(n == 1 for n in refs.values()), "a block is owned twice"
    assert set(tables) <= set(sched.requests), "a block table outlived its request"
    for req in sched.state.running:
        assert len(tables.get(req.seq_id, ())) * blocks.block_size >= req.num_computed_tokens
    host = [b for t in blocks.host_tables.values() for b in t]
    assert sorted(host + blocks.free_host_block_ids()) == list(range(blocks.num_host_blocks)), \
        "a host block leaked or is owned twice"
    for seq_id in blocks.host_tables:
        assert seq_id not in tables, "a swapped-out sequence still holds device blocks"
        assert sched.requests[seq_id] in sched.state.waiting


def assert_iteration_within_limits(policy: str, sched, plan, budget: int, max_batch: int) -> None:
    assert len(set(plan.seq_ids)) == len(plan.seq_ids), "a sequence was scheduled twice"
    assert len(plan.seq_ids) <= max_batch
    if policy in WHOLE_PROMPT_POLICIES:
        # A whole prompt longer than the budget may run, but only as the one oversized chunk.
        largest = max(plan.num_scheduled_tokens, default=0)
        assert plan.num_tokens - largest <= budget
    else:
        assert plan.num_tokens <= budget


def run_workload(policy, prefix_caching, swap, overlap, block_size, extra_blocks, budget, max_batch,
                 requests, aborts, shared_prefix, host_share=0.5):
    longest = max(p + m for p, m, _, _ in requests)
    num_blocks = -(-longest // block_size) + extra_blocks  # the largest request fits alone
    max_batch = min(max_batch, budget)
    sched = make_scheduler(policy, num_blocks=num_blocks, block_size=block_size,
                           token_budget=budget, max_batch_size=max_batch,
                           prefix_caching=prefix_caching, watermark=0.1,
                           num_host_blocks=int(host_share * num_blocks) if swap else 0)
    # shared_prefix: every prompt starts alike (cache hits); else every prompt is unique.
    pending = sorted((arrive, i, p, m, prio) for i, (p, m, arrive, prio) in enumerate(requests))
    aborted: set[int] = set()
    finished: set[int] = set()
    in_flight = None
    for it in range(5000):
        while pending and pending[0][0] <= it:
            _, i, p, m, prio = pending.pop(0)
            prompt = [k % 3 if shared_prefix else 1000 * i + k for k in range(p)]
            sched.add(make_request(i, p, m, prompt=prompt, priority=prio))
        for when, victim in aborts:
            if when == it and sched.abort(victim):
                aborted.add(victim)
        if not sched.has_work() and not pending:
            break
        if overlap:
            # Like the engine with overlap: plan N+1 is made before result N is applied.
            plan = sched.schedule()
            result = simulated_output(sched, plan)
            updates = sched.update(in_flight) if in_flight is not None else []
            in_flight = result
        else:
            plan, updates = step(sched)
        finished |= {u.seq_id for u in updates if u.finish_reason is not None}
        assert_iteration_within_limits(policy, sched, plan, budget, max_batch)
        assert_blocks_consistent(sched)
        if in_flight is not None and not sched.has_work() and not pending:
            updates = sched.update(in_flight)
            finished |= {u.seq_id for u in updates if u.finish_reason is not None}
            in_flight = None
    assert not pending and not sched.has_work(), "the scheduler stopped making progress"
    assert finished | aborted == set(range(len(requests))), "an admitted request never ended"
    assert not sched.blocks.tables
    assert sched.blocks.num_free_blocks == sched.blocks.num_blocks, "blocks leaked at the end"
    assert len(sched.blocks.free_host_block_ids()) == sched.blocks.num_host_blocks
    return sched


workloads = dict(
    block_size=st.sampled_from([1, 2, 4, 16]),
    extra_blocks=st.integers(0, 30),
    budget=st.integers(1, 96),
    max_batch=st.integers(1, 8),
    requests=st.lists(st.tuples(st.integers(1, 60), st.integers(1, 20), st.integers(0, 30),
                                st.integers(0, 2)),
                      min_size=1, max_size=12),
    aborts=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 11)), max_size=4),
    shared_prefix=st.booleans(),
    host_share=st.sampled_from([0.2, 0.5, 2.0]),
)


@pytest.mark.parametrize("overlap", [False, True], ids=["in_step", "overlapped"])
@pytest.mark.parametrize("cache", ["plain", "prefix_caching", "swap", "prefix_caching+swap"])
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_random_workloads_keep_blocks_consistent_and_always_finish(policy, cache, overlap):
    @settings(max_examples=30, deadline=None)
    @given(**workloads)
    def check(**kw):
        run_workload(policy, "prefix_caching" in cache, "swap" in cache, overlap, **kw)

    check()

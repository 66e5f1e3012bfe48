"""The block manager: watermark, freeing, and prefix caching (shared blocks, ref counts, LRU
eviction), through the real scheduler where a plan shows the effect."""

from __future__ import annotations

from scheduler_sim import make_request, make_scheduler, step

from scheduler_service.block_manager import BlockManager, CacheConfig
from scheduler_service.kv_cache import make_block_manager
from scheduler_service.policies.base import ScheduleOutput
from scheduler_service.prefix_caching import PrefixCachingBlockManager

PREFIX = list(range(1000, 1256))  # 256 tokens = 16 blocks of 16


def new_sequences(plan) -> dict[int, object]:
    return {s.seq_id: s for s in plan.new_sequences}


def run_to_end(sched) -> None:
    for _ in range(5000):
        if not sched.has_work():
            return
        step(sched)
    raise AssertionError("the scheduler did not finish")


def test_prefix_caching_is_off_by_default():
    assert type(make_block_manager(10, 4, CacheConfig())) is BlockManager
    assert isinstance(make_block_manager(10, 4, CacheConfig(prefix_caching=True)),
                      PrefixCachingBlockManager)


def test_a_second_request_sharing_a_256_token_prefix_prefills_only_the_rest():
    sched = make_scheduler("sarathi", token_budget=512, prefix_caching=True)
    sched.add(make_request(0, 0, 4, prompt=PREFIX + [1, 2, 3, 4, 5]))
    run_to_end(sched)
    sched.add(make_request(1, 0, 4, prompt=PREFIX + [9, 8, 7]))
    plan, _ = step(sched)
    seq = new_sequences(plan)[1]
    assert seq.num_computed_tokens == 256, "the worker is told the prefix is in the cache"
    i = plan.seq_ids.index(1)
    assert (plan.num_computed_tokens[i], plan.num_scheduled_tokens[i]) == (256, 3)
    stats = sched.blocks.prefix_stats
    assert (stats.num_queries, stats.query_tokens, stats.hit_tokens) == (2, 261 + 259, 256)


def test_running_requests_share_their_prefix_blocks_and_free_them_only_when_both_end():
    sched = make_scheduler("sarathi", token_budget=512, prefix_caching=True)
    sched.add(make_request(0, 0, 30, prompt=PREFIX + [1]))
    step(sched)
    sched.add(make_request(1, 0, 2, prompt=PREFIX + [2]))
    step(sched)
    t0, t1 = sched.blocks.tables[0], sched.blocks.tables[1]
    assert t0[:16] == t1[:16] and t0[16] != t1[16]
    assert all(sched.blocks.ref_count(b) == 2 for b in t0[:16])
    while 1 in sched.requests:
        step(sched)
    assert all(sched.blocks.ref_count(b) == 1 for b in t0[:16]), "request 0 still holds them"


def test_a_hit_always_leaves_the_last_prompt_token_to_compute():
    sched = make_scheduler("sarathi", token_budget=512, prefix_caching=True)
    sched.add(make_request(0, 0, 2, prompt=PREFIX))
    run_to_end(sched)
    sched.add(make_request(1, 0, 2, prompt=PREFIX))  # the very same 16 full blocks
    plan, _ = step(sched)
    i = plan.seq_ids.index(1)
    assert (plan.num_computed_tokens[i], plan.num_scheduled_tokens[i]) == (240, 16)


def test_a_preempted_request_recomputes_only_what_was_evicted():
    sched = make_scheduler("sarathi", num_blocks=64, token_budget=512, prefix_caching=True)
    sched.add(make_request(0, 0, 10, prompt=PREFIX + [1]))
    step(sched)
    sched.state.preempt(sched.requests[0], ScheduleOutput())
    plan, _ = step(sched)
    i = plan.seq_ids.index(0)
    assert plan.num_computed_tokens[i] == 256, "its own blocks stayed cached while it waited"


def test_unreferenced_cached_blocks_count_as_free_and_are_evicted_oldest_first():
    blocks = PrefixCachingBlockManager(num_blocks=4, block_size=2, watermark=0.0)
    a = make_request(0, 0, 1, prompt=[1, 2, 3])
    b = make_request(1, 0, 1, prompt=[5, 6, 7])
    for req in (a, b):
        blocks.acquire_prefix(req)
        blocks.allocate(req.seq_id, 3)
        req.num_computed_tokens = 3
        blocks.cache_blocks(req)
    cached_a, cached_b = blocks.tables[0][0], blocks.tables[1][0]
    blocks.free(0)
    blocks.free(1)
    assert blocks.num_free_blocks == 4
    assert blocks.evictable_block_ids() == [cached_a, cached_b]
    blocks.allocate(9, 6)  # 3 blocks: the 2 plain free ones, then the oldest cached one
    assert cached_a in blocks.tables[9] and cached_b not in blocks.tables[9]
    again = make_request(2, 0, 1, prompt=[1, 2, 3])
    assert blocks.acquire_prefix(again) == 0, "block a was evicted: its key is gone"
    again_b = make_request(3, 0, 1, prompt=[5, 6, 9])
    assert blocks.acquire_prefix(again_b) == 2 and blocks.tables[3] == [cached_b]


def test_keys_cover_every_token_before_the_block():
    blocks = PrefixCachingBlockManager(num_blocks=8, block_size=2)
    a = make_request(0, 0, 1, prompt=[1, 2, 3, 4, 5])
    blocks.acquire_prefix(a)
    blocks.allocate(0, 5)
    a.num_computed_tokens = 5
    blocks.cache_blocks(a)
    other_start = make_request(1, 0, 1, prompt=[9, 9, 3, 4, 5])  # same second block, new first
    assert blocks.acquire_prefix(other_start) == 0


def test_admission_keeps_the_watermark_free_but_a_lone_request_may_use_it():
    # 10 blocks of 4, watermark 20% = 2 blocks.
    sched = make_scheduler("sarathi", num_blocks=10, block_size=4, token_budget=64, watermark=0.2)
    sched.add(make_request(0, prompt_len=36, max_tokens=4))   # 9 blocks: alone, may use them
    plan, _ = step(sched)
    assert plan.num_scheduled_tokens == [36]
    run_to_end(sched)
    sched.add(make_request(1, prompt_len=20, max_tokens=20))  # 5 blocks
    sched.add(make_request(2, prompt_len=20, max_tokens=2))   # 5 more would leave 0 < 2 free
    plan, _ = step(sched)
    assert plan.seq_ids == [1, 2] and plan.num_scheduled_tokens == [20, 12], \
        "the second prompt takes only what leaves the watermark free"


def test_blocks_are_freed_on_finish_abort_and_preemption():
    sched = make_scheduler("sarathi", num_blocks=6, block_size=4, token_budget=32)
    for i in range(3):
        sched.add(make_request(i, prompt_len=8, max_tokens=8))
    step(sched)
    sched.abort(0)
    assert 0 not in sched.blocks.tables
    run_to_end(sched)
    assert sched.blocks.num_free_blocks == 6 and not sched.blocks.tables

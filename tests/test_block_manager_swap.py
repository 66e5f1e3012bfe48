"""Preemption by swapping: the plan carries the block copies, a swapped-out request comes back
with its KV and recomputes nothing but its last token; the worker's copies move the right KV."""

from __future__ import annotations

import pytest
import torch
from scheduler_sim import make_request, make_scheduler, run_to_end, step

from protos.batch_plan import BatchPlan
from worker_service.kv_swap import HostKVCache, SwapError, apply_swaps


def test_a_preempted_request_is_swapped_out_and_comes_back_without_recomputing():
    # 6 blocks of 4 tokens: three requests of 8 + 8 tokens cannot all stay resident.
    sched = make_scheduler("sarathi", num_blocks=6, block_size=4, token_budget=32,
                           num_host_blocks=8)
    for i in range(3):
        sched.add(make_request(i, prompt_len=8, max_tokens=8))
    plans = run_to_end(sched)
    out = next(p for p in plans if p.swap_out_device_blocks)
    victim = out.dropped_seq_ids[0]
    back = next(p for p in plans if any(s.seq_id == victim for s in p.new_sequences
                                        if p.step_id > out.step_id))
    seq = next(s for s in back.new_sequences if s.seq_id == victim)
    assert back.swap_in_host_blocks == out.swap_out_host_blocks, "its own host blocks come back"
    assert back.swap_in_device_blocks == seq.block_table[:len(out.swap_out_host_blocks)]
    assert seq.num_computed_tokens == len(seq.token_ids) - 1, "only the last token is recomputed"
    i = back.seq_ids.index(victim)
    assert back.num_scheduled_tokens[i] == 1
    assert sched.blocks.num_free_blocks == 6 and len(sched.blocks.free_host_block_ids()) == 8


def test_preemption_falls_back_to_recompute_when_host_blocks_run_out():
    sched = make_scheduler("sarathi", num_blocks=6, block_size=4, token_budget=32,
                           num_host_blocks=1)
    for i in range(3):
        sched.add(make_request(i, prompt_len=8, max_tokens=8))
    plans = run_to_end(sched)
    assert not any(p.swap_out_device_blocks for p in plans)
    assert any(p.dropped_seq_ids for p in plans), "requests were preempted by recompute"


def test_aborting_a_swapped_out_request_frees_its_host_blocks():
    sched = make_scheduler("sarathi", num_blocks=6, block_size=4, token_budget=32,
                           num_host_blocks=8)
    for i in range(3):
        sched.add(make_request(i, prompt_len=8, max_tokens=8))
    for _ in range(100):
        plan, _ = step(sched)
        if plan.swap_out_device_blocks:
            break
    victim = plan.dropped_seq_ids[0]
    assert sched.blocks.host_tables[victim]
    sched.abort(victim)
    assert victim not in sched.blocks.host_tables
    assert len(sched.blocks.free_host_block_ids()) == 8


def layer_caches(num_blocks: int, layers: int = 2) -> list[torch.Tensor]:
    return [torch.randn(num_blocks, 2, 4, 2, 8) for _ in range(layers)]


def test_swap_out_then_in_puts_the_same_kv_in_the_new_blocks_of_every_layer():
    device = layer_caches(6)
    host = HostKVCache(4, device)
    before = [c[[1, 4]].clone() for c in device]
    apply_swaps(host, device, BatchPlan(1, swap_out_device_blocks=[1, 4],
                                        swap_out_host_blocks=[3, 0]))
    for c in device:
        c[[1, 4]] = 0  # the blocks go to someone else
    apply_swaps(host, device, BatchPlan(2, swap_in_host_blocks=[3, 0],
                                        swap_in_device_blocks=[5, 2]))
    for c, old in zip(device, before, strict=True):
        assert torch.equal(c[[5, 2]], old)


def test_swap_out_happens_before_swap_in_within_one_plan():
    device = layer_caches(4)
    host = HostKVCache(2, device)
    host.layers[0][1] = 7.0
    host.layers[1][1] = 7.0
    kept = [c[2].clone() for c in device]
    # Block 2 leaves for host block 0, and host block 1 comes into device block 2.
    apply_swaps(host, device, BatchPlan(1, swap_out_device_blocks=[2], swap_out_host_blocks=[0],
                                        swap_in_host_blocks=[1], swap_in_device_blocks=[2]))
    for c, h, old in zip(device, host.layers, kept, strict=True):
        assert torch.equal(h[0], old) and bool((c[2] == 7.0).all())


def test_a_plan_that_swaps_without_a_host_cache_is_refused():
    with pytest.raises(SwapError):
        apply_swaps(None, layer_caches(2), BatchPlan(1, swap_out_device_blocks=[0],
                                                    swap_out_host_blocks=[0]))

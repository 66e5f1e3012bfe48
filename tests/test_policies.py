"""Each policy's defining behaviour, read off the scheduler's per-iteration plans (real
scheduler, real block manager, a simulated worker)."""

from __future__ import annotations

import pytest
from scheduler_sim import make_request, make_scheduler, run_to_end, step

from scheduler_service.policies import POLICIES


def scheduled(plan) -> dict[int, int]:
    return dict(zip(plan.seq_ids, plan.num_scheduled_tokens, strict=True))


def run_until_decoding(sched, seq_ids) -> None:
    for _ in range(1000):
        if all(sched.requests[i].is_decoding for i in seq_ids):
            return
        step(sched)
    raise AssertionError("the requests never reached their decode phase")


# --- vllm -------------------------------------------------------------------------------------
def test_vllm_stalls_running_decodes_while_a_new_prompt_prefills():
    sched = make_scheduler("vllm", token_budget=1024)
    for i in range(4):
        sched.add(make_request(i, prompt_len=8, max_tokens=50))
    run_until_decoding(sched, range(4))
    sched.add(make_request(99, prompt_len=600, max_tokens=4))
    plan, _ = step(sched)
    assert scheduled(plan) == {99: 600}, "the prefill iteration holds the whole prompt, no decodes"
    plan, _ = step(sched)
    assert scheduled(plan) == {0: 1, 1: 1, 2: 1, 3: 1, 99: 1}, "decodes resume after the prefill"


def test_vllm_prefills_whole_prompts_up_to_the_token_budget():
    sched = make_scheduler("vllm", token_budget=100)
    for i in range(3):
        sched.add(make_request(i, prompt_len=40, max_tokens=2))
    first, _ = step(sched)
    second, _ = step(sched)
    assert scheduled(first) == {0: 40, 1: 40}
    assert scheduled(second) == {2: 40}, "the third prompt waits for the next prefill iteration"


def test_vllm_admits_a_prompt_longer_than_the_budget_alone():
    sched = make_scheduler("vllm", token_budget=32)
    sched.add(make_request(0, prompt_len=100, max_tokens=2))
    sched.add(make_request(1, prompt_len=10, max_tokens=2))
    first, _ = step(sched)
    second, _ = step(sched)
    assert scheduled(first) == {0: 100}
    assert scheduled(second) == {1: 10}


# --- sarathi_dynamic ----------------------------------------------------------------------------
def test_dynamic_chunking_shrinks_the_prefill_chunk_as_decodes_grow():
    # fixed 5 ms + 0.1 ms a token, target 20 ms: 150 tokens in all, chunks rounded to 16.
    from scheduler_service.policies.cost_model import IterationCostModel

    model = IterationCostModel(fixed_ms=5.0, ms_per_token=0.1, ms_per_context_token=0.0)
    sched = make_scheduler("sarathi_dynamic", token_budget=512, max_batch_size=128,
                           target_iteration_ms=20.0, cost_model=model, min_chunk_size=16)
    sched.add(make_request(0, prompt_len=1000, max_tokens=1))
    plan, _ = step(sched)
    assert scheduled(plan) == {0: 144}, "alone, the chunk fills the time target"
    for i in range(1, 101):
        sched.add(make_request(i, prompt_len=1, max_tokens=100))
    run_until_decoding(sched, range(1, 101))
    sched.add(make_request(200, prompt_len=1000, max_tokens=1))
    plan, _ = step(sched)
    chunk = scheduled(plan)[200]
    assert chunk == 48, "100 decodes leave 50 tokens of the target: a chunk of 48"
    assert all(scheduled(plan)[i] == 1 for i in range(1, 101)), "decodes still never stall"


def test_dynamic_chunking_never_shrinks_below_the_smallest_chunk():
    from scheduler_service.policies.cost_model import IterationCostModel

    model = IterationCostModel(fixed_ms=50.0, ms_per_token=0.1, ms_per_context_token=0.0)
    sched = make_scheduler("sarathi_dynamic", token_budget=512, target_iteration_ms=20.0,
                           cost_model=model, min_chunk_size=32)
    sched.add(make_request(0, prompt_len=100, max_tokens=1))
    plan, _ = step(sched)
    assert scheduled(plan) == {0: 32}


# --- orca -------------------------------------------------------------------------------------
def test_orca_mixes_a_whole_prompt_with_the_running_decodes():
    sched = make_scheduler("orca", token_budget=512)
    for i in range(4):
        sched.add(make_request(i, prompt_len=8, max_tokens=50))
    run_until_decoding(sched, range(4))
    sched.add(make_request(99, prompt_len=300, max_tokens=4))
    plan, _ = step(sched)
    assert scheduled(plan) == {0: 1, 1: 1, 2: 1, 3: 1, 99: 300}, "decodes and a whole prompt"


def test_orca_never_chunks_a_prompt_even_past_the_budget():
    sched = make_scheduler("orca", token_budget=64)
    for i in range(4):
        sched.add(make_request(i, prompt_len=8, max_tokens=50))
    run_until_decoding(sched, range(4))
    sched.add(make_request(99, prompt_len=200, max_tokens=4))
    sched.add(make_request(100, prompt_len=10, max_tokens=4))
    plan, _ = step(sched)
    assert scheduled(plan) == {0: 1, 1: 1, 2: 1, 3: 1, 99: 200}, "one oversized prompt, alone"
    plan, _ = step(sched)
    assert scheduled(plan)[100] == 10


# --- faster_transformer ---------------------------------------------------------------------------
def test_faster_transformer_admits_nobody_until_the_whole_batch_finishes():
    sched = make_scheduler("faster_transformer", token_budget=512, max_batch_size=4)
    sched.add(make_request(0, prompt_len=20, max_tokens=3))
    sched.add(make_request(1, prompt_len=30, max_tokens=12))
    first, _ = step(sched)
    assert scheduled(first) == {0: 20, 1: 30}, "the batch prefills together"
    sched.add(make_request(2, prompt_len=5, max_tokens=2))
    batch_plans = []
    while 1 in sched.requests:
        plan, _ = step(sched)
        batch_plans.append(scheduled(plan))
    assert all(2 not in p for p in batch_plans), "a request joined a running batch"
    assert any(0 not in p and 1 in p for p in batch_plans), "request 0 finished early"
    plan, _ = step(sched)
    assert scheduled(plan) == {2: 5}, "the next batch starts once the last one finished"


def test_faster_transformer_batch_holds_only_requests_whose_worst_case_fits_the_cache():
    # 10 blocks of 4 tokens; each request may need 8 + 8 = 16 tokens = 4 blocks: two fit.
    sched = make_scheduler("faster_transformer", num_blocks=10, block_size=4, token_budget=512)
    requests = [make_request(i, prompt_len=8, max_tokens=8) for i in range(3)]
    for req in requests:
        sched.add(req)
    plans = run_to_end(sched)
    assert set(scheduled(plans[0])) == {0, 1}
    assert all(len(p.seq_ids) <= 2 for p in plans)
    assert all(r.num_preemptions == 0 for r in requests), "a batch ran out of blocks"


# --- simple_chunking --------------------------------------------------------------------------
def test_simple_chunking_never_mixes_prefill_chunks_and_decodes():
    sched = make_scheduler("simple_chunking", token_budget=64)
    for i in range(4):
        sched.add(make_request(i, prompt_len=8, max_tokens=40))
    run_until_decoding(sched, range(4))
    sched.add(make_request(99, prompt_len=300, max_tokens=4))
    kinds = []
    for plan in run_to_end(sched):
        decodes = [s for s, n in scheduled(plan).items() if sched_was_decode(s, n, plan)]
        prefills = [s for s in plan.seq_ids if s not in decodes]
        assert not (decodes and prefills), f"step {plan.step_id} mixes prefill and decode"
        kinds.append("p" if prefills else "d")
        assert plan.num_tokens <= 64
    # While the long prompt prefills, its chunks and the decodes take turns.
    assert "pdpdpd" in "".join(kinds)


def sched_was_decode(seq_id: int, num_tokens: int, plan) -> bool:
    """A chunk of one token that starts past the prompt is a decode (prompts here are > 1)."""
    i = plan.seq_ids.index(seq_id)
    return num_tokens == 1 and plan.num_computed_tokens[i] >= 8


def test_simple_chunking_splits_prompts_into_chunks_of_the_budget():
    sched = make_scheduler("simple_chunking", token_budget=16)
    sched.add(make_request(1, prompt_len=50, max_tokens=1))
    chunks = [n for plan in run_to_end(sched) for n in plan.num_scheduled_tokens]
    assert chunks == [16, 16, 16, 2]


# --- every policy -------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_a_request_that_fits_the_cache_only_alone_still_finishes(policy):
    # 8 blocks of 4 tokens = 32 slots; the big request needs all 32.
    sched = make_scheduler(policy, num_blocks=8, block_size=4, token_budget=16, max_batch_size=4)
    sched.add(make_request(0, prompt_len=10, max_tokens=10))
    sched.add(make_request(1, prompt_len=20, max_tokens=12))
    sched.add(make_request(2, prompt_len=6, max_tokens=6))
    finished = set()
    for _ in range(2000):
        if not sched.has_work():
            break
        _, updates = step(sched)
        finished |= {u.seq_id for u in updates if u.finish_reason is not None}
    assert finished == {0, 1, 2}
    assert sched.blocks.num_free_blocks == 8


# --- priorities -------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_higher_priority_is_admitted_first_and_fifo_within_a_priority(policy):
    sched = make_scheduler(policy, token_budget=8, max_batch_size=1)
    for seq_id, prio in [(0, 0), (1, 5), (2, 0), (3, 5), (4, 9)]:
        sched.add(make_request(seq_id, prompt_len=4, max_tokens=2, priority=prio))
    order = []
    for plan in run_to_end(sched):
        order += [s for s in plan.seq_ids if s not in order]
    assert order == [4, 1, 3, 0, 2]


@pytest.mark.parametrize("policy", ["sarathi", "vllm", "orca", "simple_chunking"])
def test_a_high_priority_request_preempts_lower_ones_when_blocks_run_out(policy):
    # 8 blocks of 4: two low-priority requests hold 3 blocks each (more as they decode).
    sched = make_scheduler(policy, num_blocks=8, block_size=4, token_budget=64, watermark=0.0)
    sched.add(make_request(0, prompt_len=12, max_tokens=20, priority=0))
    sched.add(make_request(1, prompt_len=12, max_tokens=20, priority=0))
    run_until_decoding(sched, [0, 1])
    sched.add(make_request(9, prompt_len=16, max_tokens=4, priority=3))
    plan, _ = step(sched)
    plans = [plan]
    while 9 not in plan.seq_ids:
        plan, _ = step(sched)
        plans.append(plan)
    assert len(plans) <= 2, "the high-priority request waited for low-priority ones to finish"
    dropped = [s for p in plans for s in p.dropped_seq_ids]
    assert dropped and dropped[0] == 1, "the newest low-priority request is preempted first"
    finished = set()
    while sched.has_work():
        _, updates = step(sched)
        finished |= {u.seq_id for u in updates if u.finish_reason is not None}
    assert finished == {0, 1, 9}


def test_a_preempted_request_goes_back_ahead_of_its_priority_but_behind_higher_ones():
    sched = make_scheduler("sarathi")
    state = sched.state
    for seq_id, prio in [(0, 5), (1, 1), (2, 1)]:
        sched.add(make_request(seq_id, prompt_len=4, max_tokens=2, priority=prio))
    state.requeue(make_request(7, prompt_len=4, max_tokens=2, priority=1))
    assert [r.seq_id for r in state.waiting] == [0, 7, 1, 2]

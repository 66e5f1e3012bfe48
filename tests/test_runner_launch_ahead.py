"""The worker launches step i+1 before it has read step i's tokens: a decode's input is then the
token still on the device. Same tokens as running each step to completion."""

from __future__ import annotations

import pytest
import torch
from test_parallel_sharding import CPU, _load

from benchmarks.step.harness import PlanMaker, launch_ahead
from worker_service.runner import ModelRunner, PlanError


def _plans():
    maker = PlanMaker()
    plans = [maker.new_sequences(3, 20), maker.new_sequences(2, 33)]
    for _ in range(6):
        plans += [maker.decode([0, 1, 2, 3, 4])]
    plans += [maker.decode([0, 2]), maker.decode([1, 3, 4]), maker.decode([0, 1, 2, 3, 4])]
    # Hybrid iterations: decodes reading tokens still on the device beside a new prompt.
    plans += [maker.hybrid([0, 2], 9), maker.hybrid([1, 3, 4, 5], 17), maker.decode([0, 1, 2, 3, 4, 5, 6])]
    return plans


def _runner() -> ModelRunner:
    runner = ModelRunner(_load(), CPU, torch.float32)
    runner.init_cache(64, 16)
    return runner


def test_launching_the_next_step_before_reading_tokens_changes_no_token():
    plans = _plans()
    serial = _runner()
    expected = [serial.execute(p).token_ids for p in plans]

    ahead = _runner()
    assert launch_ahead(ahead, plans) == expected
    assert all(-1 not in s.token_ids for s in ahead.seqs.values())


def test_a_plan_that_feeds_an_unknown_token_is_refused():
    runner = _runner()
    maker = PlanMaker()
    runner.execute(maker.new_sequences(1, 20))
    runner.seqs[0].token_ids[5] = -1   # as if a prefill chunk could read a token still in flight
    runner.seqs[0].num_computed_tokens = 0
    bad = maker.decode([0])
    bad.num_computed_tokens[0], bad.num_scheduled_tokens[0] = 0, 21
    with pytest.raises(PlanError, match="neither known"):
        runner.execute(bad)


def test_piecewise_hybrid_pieces_give_the_same_tokens_as_the_whole_forward():
    """The pieces HybridGraphs captures on a GPU (cut at each attention call, tokens padded to
    a bucket), run eagerly here: same tokens as the model's own forward."""
    maker = PlanMaker()
    plans = [maker.new_sequences(2, 45), maker.new_sequences(3, 20)]
    for _ in range(4):
        plans.append(maker.decode([0, 1, 2, 3, 4]))
    plans.append(maker.new_sequences(1, 70))           # a prefill beside nothing
    plans.append(maker.decode([0, 1, 2, 3, 4, 5]))
    whole = _runner()
    want = [whole.execute(p).token_ids for p in plans]
    pieces = ModelRunner(_load(), CPU, torch.float32, hybrid_graph_tokens=128)
    pieces.init_cache(64, 16)
    assert pieces.hybrid_graphs is not None and pieces.hybrid_graphs.max_tokens == 128
    assert [pieces.execute(p).token_ids for p in plans] == want

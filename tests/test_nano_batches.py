"""Two nano-batches per iteration (worker_service/nano_batches.py): which sequences go where, and
the same tokens as the whole batch, chunked prefills, decodes and tokens still in flight
included. On the CPU the two halves run one after the other; tests/gpu runs them on streams."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import collect, greedy_request, hf_greedy
from hypothesis import given
from hypothesis import strategies as st
from test_parallel_sharding import CPU, _load
from test_runner_launch_ahead import _plans

from benchmarks.step.harness import drive, launch_ahead
from worker_service.attention import make_backend
from worker_service.nano_batches import split_sequences
from worker_service.runner import ModelRunner


def starts(lengths: list[int]) -> list[int]:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


def test_half_the_decodes_go_with_every_chunk_and_the_other_half_alone():
    # Rows as the runner orders them: five decodes, then chunks of 40 and 7 tokens.
    assert split_sequences(starts([1, 1, 1, 1, 1, 40, 7])) == ([0, 1, 5, 6], [2, 3, 4])


def test_an_iteration_with_fewer_than_two_decodes_is_not_split():
    assert split_sequences(starts([1, 40, 7])) is None
    assert split_sequences(starts([64])) is None


@given(st.integers(0, 40), st.lists(st.integers(2, 300), max_size=4))
def test_the_split_partitions_the_sequences_and_the_second_holds_decodes_only(decodes, chunks):
    split = split_sequences(starts([1] * decodes + chunks))
    if decodes < 2:
        assert split is None
        return
    first, second = split
    assert sorted(first + second) == list(range(decodes + len(chunks)))
    assert all(s < decodes for s in second) and len(second) - len(first[:decodes // 2]) in (0, 1)


def runner(nano: bool) -> ModelRunner:
    r = ModelRunner(_load(), CPU, torch.float32)
    if nano:
        r.enable_nano_batches(1, (make_backend("torch", CPU), make_backend("torch", CPU)))
    r.init_cache(6 * 32, 16)   # drive gives each sequence 32 blocks
    return r


def record_splits(r: ModelRunner) -> list:
    """Every split the runner's nano-batches make from here on (None: the batch ran whole)."""
    splits = []
    original = r.nano_batches.split
    r.nano_batches.split = lambda batch: splits.append(original(batch)) or splits[-1]
    return splits


def test_chunked_prefills_beside_decodes_give_the_same_tokens_in_nano_batches():
    prompts = [list(range(5 + 7 * i, 5 + 7 * i + n)) for i, n in enumerate([5, 16, 33, 90, 1, 64])]
    whole_tokens, whole_logits = drive(runner(False), prompts, 10, chunk=48)
    nano = runner(True)
    split = record_splits(nano)
    nano_tokens, nano_logits = drive(nano, prompts, 10, chunk=48)
    assert nano_tokens == whole_tokens
    for sid, rows in whole_logits.items():
        for a, b in zip(rows, nano_logits[sid], strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert any(s is not None and any(len(p) > 1 for p in s) for s in split), \
        "no iteration carried a chunk beside decodes in two nano-batches"


def test_tokens_still_in_flight_reach_both_nano_batches():
    plans = _plans()
    serial = runner(False)
    expected = [serial.execute(p).token_ids for p in plans]
    ahead = runner(True)
    splits = record_splits(ahead)
    assert launch_ahead(ahead, plans) == expected
    assert sum(s is not None for s in splits) >= 6   # the decode steps of five sequences


@pytest.mark.slow   # ~20 s
def test_a_worker_serving_in_nano_batches_gives_exact_greedy_tokens(server_factory, hf_model,
                                                                      long_token_ids):
    """`--nano-batch-tokens 1` through gRPC: chunked prompts beside decodes, every iteration with
    two decodes split in two, tokens as transformers' greedy."""
    server = server_factory("--chunk-size", "32", "--nano-batch-tokens", "1")
    prompts = [long_token_ids[11 * i: 11 * i + n] for i, n in enumerate([5, 40, 130, 300])]
    stub = server.stub()
    with ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(lambda p: collect(stub.Generate(greedy_request(p, 24)))[0], prompts))
    assert got == [hf_greedy(hf_model, p, 24) for p in prompts]

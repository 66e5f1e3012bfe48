"""A replica of several workers (tensor and pipeline parallel, gloo on the CPU) samples exactly
the greedy tokens of one worker with the same weights, for concurrent prompts with chunked
prefills."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import collect, greedy_request, start_server

TINY_PROMPT_LENGTHS = [5, 12, 33, 70, 128, 201, 333, 600]
SMOL_PROMPT_LENGTHS = [5, 9, 17, 26, 40, 57, 80, 110]
NEW_TOKENS = 16
# One torch thread per worker: a replica's processes share the box's cores.
ONE_THREAD = ("--threads", "1")


def generate_all(server, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    stub = server.stub()
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(
            lambda p: collect(stub.Generate(greedy_request(p, max_tokens), timeout=240)), prompts))
    return [tokens for tokens, _, _ in results]


def run(args: tuple[str, ...], prompts: list[list[int]], max_tokens: int = NEW_TOKENS) -> list[list[int]]:
    server = start_server(*args, *ONE_THREAD, timeout=240)
    try:
        return generate_all(server, prompts, max_tokens)
    finally:
        server.stop()


TINY = ("--model", "dummy:tiny", "--weights-seed", "7", "--chunk-size", "64")


@pytest.fixture(scope="module")
def tiny_prompts() -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(1, 512) for _ in range(n)] for n in TINY_PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def tiny_reference(tiny_prompts) -> list[list[int]]:
    return run(TINY, tiny_prompts)


# PP=2's exact tokens are also test_parallel_engine's micro-batch test (make test); this one is slow.
@pytest.mark.parametrize("tp,pp", [(2, 1), pytest.param(1, 2, marks=pytest.mark.slow),
                                   pytest.param(2, 2, marks=pytest.mark.slow)],
                         ids=["tp2", "pp2", "tp2xpp2"])
def test_dummy_llama_replica_tokens_equal_one_worker(tp, pp, tiny_prompts, tiny_reference):
    got = run((*TINY, "--tensor-parallel-size", str(tp), "--pipeline-parallel-size", str(pp)), tiny_prompts)
    for length, tokens, expected in zip(TINY_PROMPT_LENGTHS, got, tiny_reference, strict=True):
        assert tokens == expected, f"prompt of {length} tokens diverged"


@pytest.mark.slow   # about 30-50 s: make test stays under 15 minutes on 2 cores
def test_smollm2_tp3_tokens_equal_tp1(long_token_ids):
    # SmolLM2: 9 heads and 3 KV heads, so TP=3 gives each rank 3 q heads and 1 KV head, and
    # its tied embedding / LM head split over the vocabulary.
    prompts = [long_token_ids[7 * i: 7 * i + n] for i, n in enumerate(SMOL_PROMPT_LENGTHS)]
    args = ("--chunk-size", "32")
    expected = run(args, prompts, 8)
    got = run((*args, "--tensor-parallel-size", "3"), prompts, 8)
    for length, tokens, ref in zip(SMOL_PROMPT_LENGTHS, got, expected, strict=True):
        assert tokens == ref, f"prompt of {length} tokens diverged"

"""Greedy tokens through the real services equal transformers' generate on the same weights."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import collect, greedy_request, hf_greedy

PROMPT_LENGTHS = [5, 12, 33, 70, 128, 201, 333, 600]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def prompts(long_token_ids) -> list[list[int]]:
    return [long_token_ids[7 * i: 7 * i + n] for i, n in enumerate(PROMPT_LENGTHS)]


@pytest.fixture(scope="module")
def references(hf_model, prompts) -> list[list[int]]:
    return [hf_greedy(hf_model, p, NEW_TOKENS) for p in prompts]


def run_concurrently(server, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    stub = server.stub()
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(lambda p: collect(stub.Generate(greedy_request(p, max_tokens))), prompts))
    return [tokens for tokens, _, _ in results]


# Sarathi at three chunk sizes; every other policy at one setting, to keep the suite short.
# `make test` runs sarathi-64 (chunked) and vllm (whole prompts); the rest are in `make test-slow`
# (CI runs both), which keeps `make test` within its 15 minutes on two cores.
SLOW_SETTINGS = {"sarathi-16", "sarathi-512", "sarathi_dynamic", "orca", "faster_transformer",
                 "simple_chunking"}
POLICY_SETTINGS = {
    "sarathi-16": ("--chunk-size", "16"),
    "sarathi-64": None,  # the shared default server
    "sarathi-512": ("--chunk-size", "512"),
    "sarathi_dynamic": ("--policy", "sarathi_dynamic", "--chunk-size", "512",
                        "--target-iteration-ms", "8"),
    "vllm": ("--policy", "vllm", "--chunk-size", "512"),
    "orca": ("--policy", "orca", "--chunk-size", "256"),
    "faster_transformer": ("--policy", "faster_transformer", "--chunk-size", "512"),
    "simple_chunking": ("--policy", "simple_chunking", "--chunk-size", "64"),
}


@pytest.mark.parametrize("setting", [pytest.param(s, marks=pytest.mark.slow) if s in SLOW_SETTINGS else s
                                     for s in POLICY_SETTINGS])
def test_concurrent_greedy_tokens_equal_transformers_generate(setting, server_factory, default_server,
                                                             prompts, references):
    args = POLICY_SETTINGS[setting]
    server = default_server if args is None else server_factory(*args)
    got = run_concurrently(server, prompts, NEW_TOKENS)
    for length, tokens, expected in zip(PROMPT_LENGTHS, got, references, strict=True):
        assert tokens == expected, f"prompt of {length} tokens diverged"


def test_preempted_requests_finish_with_exact_tokens_and_free_all_blocks(small_cache_server, prompts,
                                                                          references):
    # 48 blocks of 16 = 768 slots: the prompts need 1382 + 8 * 32, so requests must be preempted.
    server = small_cache_server
    got = run_concurrently(server, prompts, NEW_TOKENS)
    assert got == references
    metrics = server.metrics()
    assert metrics["sarathi_preemptions_total"] > 0, "the cache was meant to be too small"
    assert metrics["sarathi_kv_blocks_used"] == 0
    assert metrics["sarathi_requests_running"] == 0 and metrics["sarathi_requests_waiting"] == 0

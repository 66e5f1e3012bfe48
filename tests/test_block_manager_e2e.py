"""Prefix caching through the real services: a hit is exact and prefills only the rest."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from conftest import collect, greedy_request, hf_greedy

NEW_TOKENS = 16


def test_a_request_sharing_a_256_token_prefix_prefills_only_the_rest_with_exact_tokens(
        server_factory, hf_model, long_token_ids):
    server = server_factory("--chunk-size", "64", "--prefix-caching")
    prefix = long_token_ids[:256]
    first = prefix + long_token_ids[300:310]
    second = prefix + long_token_ids[400:420]
    stub = server.stub()
    got_first = collect(stub.Generate(greedy_request(first, NEW_TOKENS)))[0]
    before = server.metrics()["sarathi_prefill_tokens_total"]
    got_second = collect(stub.Generate(greedy_request(second, NEW_TOKENS)))[0]
    prefilled = server.metrics()["sarathi_prefill_tokens_total"] - before
    assert prefilled == len(second) - 256, "the cached prefix was computed again"
    assert got_first == hf_greedy(hf_model, first, NEW_TOKENS)
    assert got_second == hf_greedy(hf_model, second, NEW_TOKENS)
    metrics = server.metrics()
    assert metrics["sarathi_prefix_cache_hit_tokens_total"] >= 256
    assert metrics["sarathi_prefix_cache_query_tokens_total"] >= len(first) + len(second) - 2


def test_preemption_by_swapping_to_host_memory_keeps_tokens_exact(server_factory, hf_model, long_token_ids):
    # 48 device blocks cannot hold these four requests at once; 200 host blocks take the evicted KV.
    # 48 new tokens each, so that the four stay in flight together even when the requests reach
    # a loaded 2-core machine one by one (with 16, the first could finish before the last came).
    new_tokens = 48
    server = server_factory("--chunk-size", "64", "--num-kv-blocks", "48", "--num-host-kv-blocks", "200")
    prompts = [long_token_ids[9 * i: 9 * i + n] for i, n in enumerate([150, 200, 240, 300])]
    stub = server.stub()
    with ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(lambda p: collect(stub.Generate(greedy_request(p, new_tokens)))[0], prompts))
    assert server.metrics()["sarathi_preemptions_total"] > 0, "the cache was meant to be too small"
    assert got == [hf_greedy(hf_model, p, new_tokens) for p in prompts]
    assert server.metrics()["sarathi_kv_blocks_used"] == 0

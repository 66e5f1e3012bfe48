"""Prefix caching through the real services: a hit is exact and prefills only the rest."""

from __future__ import annotations

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

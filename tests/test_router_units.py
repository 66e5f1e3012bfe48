"""The router's placement policy, its prompt keys, DNS targets and settings: pure functions and
properties checked with hypothesis, and its one-line refusal to start without schedulers."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from protos import generation_pb2 as pb
from router_service.config import RouterConfig
from router_service.discovery import format_address, parse_dns_target, resolve
from router_service.placement import Load, PlacementPolicy, PrefixTable, choose, overloaded, prefix_chain
from router_service.server import routed
from sarathi_common.options import add_options, from_namespace

ADDRESSES = [f"10.0.0.{i}:50051" for i in range(1, 6)]
loads_st = st.dictionaries(st.sampled_from(ADDRESSES),
                           st.builds(Load, work=st.integers(0, 50_000), requests=st.integers(0, 200),
                                     placed=st.integers(0, 1000)), max_size=5)
policy_st = st.builds(PlacementPolicy, min_match=st.floats(0.0, 1.0), balance_abs=st.integers(0, 10_000),
                      balance_rel=st.floats(1.0, 4.0))
BLOCK = 16


@given(st.binary(max_size=400), st.binary(max_size=400))
def test_two_prompts_share_exactly_the_digests_of_the_blocks_they_share(a, b):
    ca, cb = prefix_chain(a, BLOCK), prefix_chain(b, BLOCK)
    assert len(ca) == len(a) // BLOCK
    shared_blocks = 0
    while shared_blocks < min(len(ca), len(cb)) and \
            a[:(shared_blocks + 1) * BLOCK] == b[:(shared_blocks + 1) * BLOCK]:
        shared_blocks += 1
    assert ca[:shared_blocks] == cb[:shared_blocks]
    # After the first block that differs, every digest differs (each covers all before it).
    assert all(x != y for x, y in zip(ca[shared_blocks:], cb[shared_blocks:], strict=False))


@given(loads_st, st.lists(st.binary(min_size=BLOCK, max_size=200), max_size=6), policy_st,
       st.lists(st.sampled_from(ADDRESSES), max_size=6))
def test_the_choice_is_a_scheduler_in_rotation_and_never_an_overloaded_one(loads, prompts, policy, owners):
    table = PrefixTable(64)
    for prompt, owner in zip(prompts, owners, strict=False):
        table.record(prefix_chain(prompt, BLOCK), owner)
    for prompt in prompts or [b""]:
        decision = choose(loads, prefix_chain(prompt, BLOCK), table, policy)
        if not loads:
            assert decision is None
            continue
        assert decision.address in loads
        least = min(load.work for load in loads.values())
        assert decision.address == min(loads, key=lambda a: (loads[a].work, loads[a].requests,
                                                             loads[a].placed, a)) \
            or not overloaded(loads[decision.address].work, least, policy)


@given(loads_st.filter(bool), st.binary(min_size=BLOCK, max_size=300))
def test_a_prompt_never_seen_goes_to_the_least_loaded_scheduler(loads, prompt):
    decision = choose(loads, prefix_chain(prompt, BLOCK), PrefixTable(16), PlacementPolicy())
    assert decision.reason == "least_work"
    assert loads[decision.address].work == min(load.work for load in loads.values())


@given(loads_st.filter(lambda d: len(d) >= 2), st.binary(min_size=BLOCK * 4, max_size=300),
       st.binary(max_size=BLOCK - 1), st.data())
def test_a_repeated_prefix_returns_to_its_scheduler_unless_that_one_is_overloaded(loads, prefix, tail, data):
    owner = data.draw(st.sampled_from(sorted(loads)))
    policy = PlacementPolicy(min_match=0.5)
    table = PrefixTable(1000)
    table.record(prefix_chain(prefix, BLOCK), owner)
    decision = choose(loads, prefix_chain(prefix + tail, BLOCK), table, policy)
    least = min(load.work for load in loads.values())
    if overloaded(loads[owner].work, least, policy):
        assert decision.reason == "overloaded" and loads[decision.address].work == least
    else:
        assert (decision.address, decision.reason) == (owner, "affinity")


@given(loads_st.filter(bool), st.binary(min_size=BLOCK * 2, max_size=300))
def test_a_prefix_owned_by_a_scheduler_out_of_rotation_is_placed_by_load(loads, prompt):
    table = PrefixTable(100)
    table.record(prefix_chain(prompt, BLOCK), "10.9.9.9:50051")   # not among `loads`
    assert choose(loads, prefix_chain(prompt, BLOCK), table, PlacementPolicy()).reason == "least_work"


def test_equal_loads_take_turns():
    loads = {a: Load() for a in ADDRESSES[:3]}
    seen = []
    for _ in range(6):
        address = choose(loads, (), PrefixTable(1), PlacementPolicy()).address
        seen.append(address)
        loads[address] = Load(placed=loads[address].placed + 1)
    assert sorted(seen) == sorted(ADDRESSES[:3] * 2)


@settings(max_examples=50)
@given(st.integers(1, 50), st.lists(st.binary(max_size=200), max_size=40))
def test_the_prefix_table_never_holds_more_than_its_capacity(capacity, prompts):
    table = PrefixTable(capacity)
    for i, prompt in enumerate(prompts):
        table.record(prefix_chain(prompt, BLOCK), ADDRESSES[i % len(ADDRESSES)])
        assert len(table) <= capacity


def test_the_prefix_table_forgets_the_least_recently_used_blocks_first():
    table = PrefixTable(4)
    old, new = prefix_chain(b"a" * 2 * BLOCK, BLOCK), prefix_chain(b"b" * 2 * BLOCK, BLOCK)
    table.record(old, ADDRESSES[0])
    table.record(new, ADDRESSES[1])
    table.record(old[:1], ADDRESSES[0])           # touching the first block of `old` keeps it
    table.record(prefix_chain(b"c" * BLOCK, BLOCK), ADDRESSES[2])
    assert table.longest_match(old, ADDRESSES) == (ADDRESSES[0], 1)
    assert table.longest_match(new, ADDRESSES) == (ADDRESSES[1], 2)


@given(st.text(min_size=1, max_size=300), st.text(max_size=50))
def test_text_chat_and_token_prompts_sharing_a_start_share_their_key_start(start, rest):
    assume(start)
    one = routed(pb.GenerateRequest(text=start + rest).SerializeToString(), BLOCK)
    two = routed(pb.GenerateRequest(text=start).SerializeToString(), BLOCK)
    assert one.key.startswith(two.key)
    chat = [pb.ChatMessage(role="system", content=start)]
    a = routed(pb.GenerateRequest(chat=pb.ChatPrompt(messages=chat)).SerializeToString(), BLOCK)
    b = routed(pb.GenerateRequest(chat=pb.ChatPrompt(
        messages=[*chat, pb.ChatMessage(role="user", content=rest)])).SerializeToString(), BLOCK)
    assert b.key.startswith(a.key)


def test_a_request_is_sized_by_its_prompt_and_max_tokens():
    ids = routed(pb.GenerateRequest(token_ids=pb.TokenIds(ids=range(100)),
                                    sampling=pb.SamplingParams(max_tokens=7)).SerializeToString(), BLOCK)
    assert (ids.prompt_tokens, ids.max_tokens) == (100, 7)
    text = routed(pb.GenerateRequest(text="x" * 400).SerializeToString(), BLOCK)
    assert text.prompt_tokens == 100 and text.max_tokens == 16   # the scheduler's default
    assert routed(b"\xff\xff not a message", BLOCK).key == b""


@pytest.mark.parametrize("target,expected", [
    ("scheduler.sarathi.svc.cluster.local:50051", ("scheduler.sarathi.svc.cluster.local", 50051)),
    ("localhost:1", ("localhost", 1)),
    ("[::1]:50051", ("::1", 50051)),
])
def test_a_dns_target_is_name_and_port(target, expected):
    assert parse_dns_target(target) == expected


@pytest.mark.parametrize("target", ["scheduler", "scheduler:", ":50051", "scheduler:http", "scheduler:70000"])
def test_a_dns_target_without_a_port_is_refused_in_one_line(target):
    with pytest.raises(SystemExit, match="must be NAME:PORT"):
        parse_dns_target(target)


def test_resolved_addresses_are_dialable_ipv4_and_bracketed_ipv6():
    assert format_address("10.1.2.3", 50051) == "10.1.2.3:50051"
    assert format_address("fe80::1%eth0", 50051) == "[fe80::1]:50051"
    addresses = asyncio.run(resolve("localhost", 50051))
    assert "127.0.0.1:50051" in addresses
    assert all(a.endswith(":50051") for a in addresses)


def test_the_router_config_comes_from_its_flags():
    import argparse

    parser = argparse.ArgumentParser()
    add_options(parser, RouterConfig)
    config = from_namespace(RouterConfig, parser.parse_args(
        ["--scheduler", "a:1, b:2", "--balance-abs-tokens", "10", "--join-port", "7"]))
    assert config.static_schedulers() == ("a:1", "b:2")
    assert config.placement_policy().balance_abs == 10
    assert config.join_port == 7


def test_a_router_with_no_way_to_find_schedulers_says_how_in_one_line():
    import subprocess
    import sys

    from sarathi_common.net import free_port

    out = subprocess.run([sys.executable, "-m", "router_service", "--port", str(free_port())],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1].startswith("sarathi router: no schedulers: name them")

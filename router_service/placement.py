"""Which scheduler takes a request: least outstanding work, with prefix affinity.

A prompt is cut into fixed-size blocks of bytes (its text, its rendered chat messages or its
token ids) and each block's hash covers every block before it, so two prompts share the first k
hashes exactly when they share their first k blocks. A bounded LRU table remembers which
scheduler last served each hash. A request goes to the scheduler that served its longest known
prefix (its KV blocks are likely still cached there) when enough of it matches, unless that
scheduler is overloaded against the least loaded one; otherwise to the least loaded one. This is
the shape of SGLang's cache-aware router, without a tokenizer: the router never needs one.

Pure: no gRPC, no clock; the pool (pool.py) supplies the loads.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Collection, Mapping
from dataclasses import dataclass

# Hashing stops here: affinity needs the start of a prompt, not all of a 100k-token one.
MAX_BLOCKS = 256


@dataclass(frozen=True)
class PlacementPolicy:
    min_match: float = 0.5        # share of the prompt's blocks that must match for affinity
    balance_abs: int = 4096       # outstanding tokens over the least loaded one ...
    balance_rel: float = 1.5      # ... and this many times its load: overloaded, affinity yields


@dataclass(frozen=True)
class Load:
    """What the router has outstanding at one scheduler."""

    work: int = 0       # prompt tokens not prefilled yet + tokens still to generate (estimates)
    requests: int = 0
    placed: int = 0     # requests placed there so far: equal loads take turns


@dataclass(frozen=True)
class Decision:
    address: str
    reason: str         # "affinity", "least_work", or "overloaded" (affinity yielded)
    matched: int        # prompt blocks found in the table for the chosen address


def prefix_chain(data: bytes, block_bytes: int, max_blocks: int = MAX_BLOCKS) -> tuple[bytes, ...]:
    """One 8-byte digest per full block of `data`; digest i covers blocks 0..i."""
    out: list[bytes] = []
    digest = b""
    for i in range(min(len(data) // block_bytes, max_blocks)):
        digest = hashlib.blake2b(digest + data[i * block_bytes:(i + 1) * block_bytes],
                                 digest_size=8).digest()
        out.append(digest)
    return tuple(out)


class PrefixTable:
    """Block-chain digest -> the scheduler that served it last, least recently used evicted
    first, at most `capacity` entries."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("the prefix table needs room for at least one block")
        self.capacity = capacity
        self._owner: OrderedDict[bytes, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._owner)

    def longest_match(self, chain: tuple[bytes, ...], members: Collection[str]) -> tuple[str | None, int]:
        """The member that served the longest prefix of `chain`, and how many blocks long.
        Owners that are not members now (down, left) are skipped: a shorter prefix may still
        live on a member."""
        for depth in range(len(chain), 0, -1):
            owner = self._owner.get(chain[depth - 1])
            if owner is not None and owner in members:
                return owner, depth
        return None, 0

    def record(self, chain: tuple[bytes, ...], address: str) -> None:
        owner = self._owner
        for digest in chain:
            owner[digest] = address
            owner.move_to_end(digest)
        while len(owner) > self.capacity:
            owner.popitem(last=False)


def overloaded(load: int, least: int, policy: PlacementPolicy) -> bool:
    return load - least > policy.balance_abs and load > policy.balance_rel * least


def choose(loads: Mapping[str, Load], chain: tuple[bytes, ...], table: PrefixTable,
           policy: PlacementPolicy) -> Decision | None:
    """The scheduler for a request whose prompt has `chain`, among `loads` (the schedulers in
    rotation, minus any already tried); None when there is none."""
    if not loads:
        return None
    least = min(loads, key=lambda a: (loads[a].work, loads[a].requests, loads[a].placed, a))
    if chain:
        owner, matched = table.longest_match(chain, loads)
        if owner is not None and matched >= policy.min_match * len(chain):
            if not overloaded(loads[owner].work, loads[least].work, policy):
                return Decision(owner, "affinity", matched)
            return Decision(least, "overloaded", 0)
    return Decision(least, "least_work", 0)

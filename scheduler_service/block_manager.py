"""The KV-cache block manager: a free list, one block table per sequence, ref counts.

The scheduler's block manager is the single source of truth for which block holds which
tokens; the worker only receives copies (as deltas) in the plans.

`BlockManager` gives every block one owner. `PrefixCachingBlockManager` (prefix_caching.py)
shares full blocks between sequences with equal prefixes (`make_block_manager` in kv_cache.py
picks one); both keep this contract:

- a block is either free, or referenced by ref_count(b) >= 1 block tables (counted with
  multiplicity), or (prefix caching only) evictable: unreferenced but still holding cached KV;
- num_free_blocks counts free and evictable blocks: both can be handed out.

With host blocks (CacheConfig.num_host_blocks > 0) a preempted sequence's KV may be swapped out
to host memory instead of being recomputed: its device blocks are copied to host blocks (the plan
carries the pairs) and freed; when it is admitted again, fresh device blocks are allocated and the
host blocks copied back in.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from scheduler_service.request import Request


@dataclass(frozen=True)
class CacheConfig:
    """Block-manager knobs, fixed at start-up."""

    # Share of blocks admission leaves free, so running decodes are not preempted the moment a
    # new request is admitted. Decodes and continuing prefills may use them.
    watermark: float = 0.01
    # Reuse the KV of full blocks whose tokens (and all tokens before them) match.
    prefix_caching: bool = False
    # Host-memory blocks for preemption by swapping (0: preemption by recompute only). The
    # worker must hold a host cache of this many blocks.
    num_host_blocks: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.watermark < 1.0:
            raise ValueError("the watermark is a share of the cache in [0, 1)")
        if self.num_host_blocks < 0:
            raise ValueError("the number of host blocks cannot be negative")


@dataclass
class PrefixCacheStats:
    """Counted once per admission (not per attempt): tokens looked up and tokens found."""

    num_queries: int = 0
    query_tokens: int = 0
    hit_tokens: int = 0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, watermark: float = 0.01,
                 num_host_blocks: int = 0) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV cache needs at least one block of at least one token")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.watermark_blocks = int(watermark * num_blocks)
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks
        self.tables: dict[int, list[int]] = {}
        self.prefix_stats = PrefixCacheStats()
        self.num_host_blocks = num_host_blocks
        self._host_free: deque[int] = deque(range(num_host_blocks))
        self.host_tables: dict[int, list[int]] = {}    # swapped-out sequences' KV, in order
        self._swapped_tokens: dict[int, int] = {}      # tokens whose KV those blocks hold

    # --- counting ---------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_missing_blocks(self, seq_id: int, num_tokens: int) -> int:
        """Blocks to add so that seq_id can hold num_tokens."""
        have = len(self.tables.get(seq_id, ()))
        return max(0, self.blocks_for(num_tokens) - have)

    def can_allocate(self, seq_id: int, num_tokens: int, keep_free: int = 0) -> bool:
        return self.num_missing_blocks(seq_id, num_tokens) <= self.num_free_blocks - keep_free

    def max_tokens_allocatable(self, seq_id: int, keep_free: int = 0) -> int:
        """How many tokens seq_id could hold if it took every free block but keep_free."""
        have = len(self.tables.get(seq_id, ()))
        return (have + max(0, self.num_free_blocks - keep_free)) * self.block_size

    def num_exclusive_blocks(self, seq_id: int) -> int:
        """Blocks that freeing seq_id would give back (those no other sequence shares)."""
        return sum(1 for b in self.tables.get(seq_id, ()) if self._refs[b] == 1)

    # --- for audits (tests, metrics) ----------------------------------------------------------
    def ref_count(self, block: int) -> int:
        return self._refs[block]

    def free_block_ids(self) -> list[int]:
        return list(self._free)

    def free_host_block_ids(self) -> list[int]:
        return list(self._host_free)

    def evictable_block_ids(self) -> list[int]:
        return []

    # --- changes ----------------------------------------------------------------------------
    def allocate(self, seq_id: int, num_tokens: int) -> list[int]:
        """Grows seq_id's table to hold num_tokens; returns the newly added blocks."""
        missing = self.num_missing_blocks(seq_id, num_tokens)
        if missing > self.num_free_blocks:
            raise RuntimeError(f"allocate: {missing} blocks needed, {self.num_free_blocks} free")
        new = [self._take() for _ in range(missing)]
        self.tables.setdefault(seq_id, []).extend(new)
        return new

    def free(self, seq_id: int) -> None:
        """The sequence is gone (finished or aborted): every block it holds, device or host."""
        self.release(seq_id)
        self._host_free.extend(self.host_tables.pop(seq_id, ()))
        self._swapped_tokens.pop(seq_id, None)

    def release(self, seq_id: int) -> None:
        """Gives back the sequence's device blocks (preemption, an admission taken back)."""
        # Tail first, so that with prefix caching the tail of a prompt is evicted before its head
        # (a head is shared by more future requests than a tail).
        for block in reversed(self.tables.pop(seq_id, ())):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._unreferenced(block)

    def acquire_prefix(self, request: Request) -> int:
        """Puts the cached blocks of request's longest cached prefix into its (empty) table and
        returns how many tokens they hold. Without prefix caching: none."""
        return 0

    def cache_blocks(self, request: Request) -> None:
        """Called after request.num_computed_tokens advanced: its full computed blocks may now be
        shared. Without prefix caching: nothing to do."""

    # --- swapping ----------------------------------------------------------------------------
    def can_swap_out(self, seq_id: int) -> bool:
        table = self.tables.get(seq_id)
        return bool(table) and len(table) <= len(self._host_free)

    def swap_out(self, seq_id: int, num_tokens: int) -> list[tuple[int, int]]:
        """Moves the sequence's KV (num_tokens of it) to host blocks and frees its device
        blocks. Returns the (device block, host block) copies the worker must make before it
        writes to any of those device blocks again."""
        table = self.tables[seq_id]
        host = [self._host_free.popleft() for _ in table]
        self.host_tables[seq_id] = host
        self._swapped_tokens[seq_id] = num_tokens
        pairs = list(zip(table, host, strict=True))
        self.release(seq_id)
        return pairs

    def swapped_tokens(self, seq_id: int) -> int:
        """Tokens of KV the sequence has in host blocks (0: none)."""
        return self._swapped_tokens.get(seq_id, 0)

    def swap_in(self, seq_id: int) -> list[tuple[int, int]]:
        """After the sequence got device blocks for its swapped KV (allocate): frees its host
        blocks and returns the (host block, device block) copies the worker must make."""
        host = self.host_tables.pop(seq_id)
        del self._swapped_tokens[seq_id]
        pairs = list(zip(host, self.tables[seq_id][:len(host)], strict=True))
        self._host_free.extend(host)
        return pairs

    def record_admission(self, cached_tokens: int, num_tokens: int) -> None:
        self.prefix_stats.num_queries += 1
        self.prefix_stats.query_tokens += num_tokens
        self.prefix_stats.hit_tokens += cached_tokens

    # --- hooks for subclasses -----------------------------------------------------------------
    def _take(self) -> int:
        block = self._free.popleft()
        self._refs[block] = 1
        return block

    def _unreferenced(self, block: int) -> None:
        self._free.append(block)


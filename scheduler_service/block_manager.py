"""The KV-cache block manager: a free list and one block table per sequence.

The scheduler's block manager is the single source of truth for which block holds which
tokens; the worker only receives copies (as deltas) in the plans.
"""

from __future__ import annotations

from collections import deque


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, watermark: float = 0.01) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV cache needs at least one block of at least one token")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Admission keeps this many blocks free, so running decodes are not preempted the moment
        # a new request is admitted.
        self.watermark_blocks = int(watermark * num_blocks)
        self._free: deque[int] = deque(range(num_blocks))
        self.tables: dict[int, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_missing_blocks(self, seq_id: int, num_tokens: int) -> int:
        """Blocks to add so that seq_id can hold num_tokens tokens."""
        have = len(self.tables.get(seq_id, ()))
        return max(0, self.blocks_for(num_tokens) - have)

    def can_allocate(self, seq_id: int, num_tokens: int, keep_free: int = 0) -> bool:
        return self.num_missing_blocks(seq_id, num_tokens) <= self.num_free_blocks - keep_free

    def allocate(self, seq_id: int, num_tokens: int) -> list[int]:
        """Grows seq_id's table to hold num_tokens; returns the newly added blocks."""
        missing = self.num_missing_blocks(seq_id, num_tokens)
        if missing > len(self._free):
            raise RuntimeError(f"allocate: {missing} blocks needed, {len(self._free)} free")
        new = [self._free.popleft() for _ in range(missing)]
        self.tables.setdefault(seq_id, []).extend(new)
        return new

    def max_tokens_allocatable(self, seq_id: int, keep_free: int = 0) -> int:
        """How many tokens seq_id could hold if it took every free block but keep_free."""
        have = len(self.tables.get(seq_id, ()))
        return (have + max(0, self.num_free_blocks - keep_free)) * self.block_size

    def free(self, seq_id: int) -> None:
        self._free.extend(self.tables.pop(seq_id, ()))

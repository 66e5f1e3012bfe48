"""Prefix caching: full KV blocks shared between sequences whose tokens agree up to them.

A full block is keyed by a hash chained over its tokens and every token before it (the key of
block i covers tokens [0, (i + 1) * block_size)), so equal keys mean equal KV: same tokens at the
same positions after the same context. Blocks are registered once their tokens are all computed
(at schedule time: plans run in order, so a later plan reads KV an earlier one wrote).

An unreferenced block keeps its KV and its key, evictable in LRU order; it counts as free and is
handed out (key dropped) only when the free list is empty.

Keys are SHA-256 digests rather than Python's hash(): a collision would silently serve one
user's KV to another, and Python's tuple hash is neither wide nor keyed.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from typing import TYPE_CHECKING

from scheduler_service.block_manager import BlockManager

if TYPE_CHECKING:
    from scheduler_service.request import Request


def extend_block_hashes(hashes: list[bytes], token_ids: list[int], block_size: int) -> None:
    """Appends to hashes the keys of token_ids' full blocks not yet hashed (hashes is a prefix
    of the answer: tokens only ever get appended to a request)."""
    parent = hashes[-1] if hashes else b""
    for start in range(len(hashes) * block_size, len(token_ids) - block_size + 1, block_size):
        block = array("I", token_ids[start:start + block_size]).tobytes()
        parent = hashlib.sha256(parent + block).digest()
        hashes.append(parent)


class PrefixCachingBlockManager(BlockManager):
    def __init__(self, num_blocks: int, block_size: int, watermark: float = 0.01,
                 num_host_blocks: int = 0) -> None:
        super().__init__(num_blocks, block_size, watermark, num_host_blocks)
        self._key_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()   # oldest first
        self._num_registered: dict[int, int] = {}   # seq_id -> leading blocks already offered

    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._evictable)

    def evictable_block_ids(self) -> list[int]:
        return list(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._block_of)

    def acquire_prefix(self, request: Request) -> int:
        seq_id = request.seq_id
        if self.tables.get(seq_id):
            raise RuntimeError(f"acquire_prefix: sequence {seq_id} already holds blocks")
        tokens = request.all_token_ids
        extend_block_hashes(request.block_hashes, tokens, self.block_size)
        # The last known token stays uncomputed: the worker samples from its logits.
        usable = (len(tokens) - 1) // self.block_size
        table: list[int] = []
        for key in request.block_hashes[:usable]:
            block = self._block_of.get(key)
            if block is None:
                break
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
            table.append(block)
        if table:
            self.tables[seq_id] = table
        self._num_registered[seq_id] = len(table)
        return len(table) * self.block_size

    def cache_blocks(self, request: Request) -> None:
        seq_id = request.seq_id
        done = self._num_registered.get(seq_id, 0)
        # Only tokens whose values are known can be hashed: with overlapped scheduling the last
        # computed token may be a sample still on its way back.
        known = request.num_prompt_tokens + len(request.output_token_ids)
        full = min(request.num_computed_tokens, known) // self.block_size
        if full <= done:
            return
        if len(request.block_hashes) < full:
            extend_block_hashes(request.block_hashes, request.all_token_ids, self.block_size)
        table = self.tables[seq_id]
        for i in range(done, full):
            key = request.block_hashes[i]
            if key not in self._block_of:
                self._block_of[key] = table[i]
                self._key_of[table[i]] = key
            # else: an equal block computed concurrently is already cached; ours stays private.
        self._num_registered[seq_id] = full

    def release(self, seq_id: int) -> None:
        self._num_registered.pop(seq_id, None)
        super().release(seq_id)

    def _take(self) -> int:
        if self._free:
            return super()._take()
        block, _ = self._evictable.popitem(last=False)
        del self._block_of[self._key_of.pop(block)]
        self._refs[block] = 1
        return block

    def _unreferenced(self, block: int) -> None:
        if block in self._key_of:
            self._evictable[block] = None
        else:
            self._free.append(block)

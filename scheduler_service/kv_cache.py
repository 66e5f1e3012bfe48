"""Picks the block manager for a cache configuration.

It sits apart from both block managers because it names both: prefix_caching.py builds on
block_manager.py, so a factory inside block_manager.py would import back up into its subclass.
"""

from __future__ import annotations

from scheduler_service.block_manager import BlockManager, CacheConfig
from scheduler_service.prefix_caching import PrefixCachingBlockManager


def make_block_manager(num_blocks: int, block_size: int, config: CacheConfig) -> BlockManager:
    if config.prefix_caching:
        return PrefixCachingBlockManager(num_blocks, block_size, config.watermark, config.num_host_blocks)
    return BlockManager(num_blocks, block_size, config.watermark, config.num_host_blocks)

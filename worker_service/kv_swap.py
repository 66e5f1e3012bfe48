"""The host side of preemption by swapping: a KV cache in host memory and the block copies a
plan asks for.

The scheduler decides every copy (BatchPlan.swap_out_* / swap_in_*); the worker only executes
them, before anything else in the plan: swap-outs first (the device blocks they read may be
handed to another sequence in this very plan), then swap-ins. Copies run on the current stream,
so they are ordered after the previous plan's KV writes and before this plan's forward.

Layout: one host tensor per layer, shaped like a device layer cache [num_blocks, 2, block_size,
kv_heads, head_dim]; pinned when the device cache is on a GPU, so copies can be asynchronous.
"""

from __future__ import annotations

import torch

from protos.batch_plan import BatchPlan


class HostKVCache:
    def __init__(self, num_blocks: int, device_caches: list[torch.Tensor]) -> None:
        self.num_blocks = num_blocks
        pin = bool(device_caches) and device_caches[0].device.type == "cuda"
        self.layers = [torch.zeros((num_blocks, *c.shape[1:]), dtype=c.dtype, pin_memory=pin)
                       for c in device_caches]

    def swap_out(self, device_caches: list[torch.Tensor], device_blocks: list[int],
                 host_blocks: list[int]) -> None:
        """Copies device_blocks[i] to host_blocks[i], every layer."""
        if not device_blocks:
            return
        dev = torch.tensor(device_blocks, dtype=torch.int64, device=device_caches[0].device)
        host = torch.tensor(host_blocks, dtype=torch.int64)
        for device_cache, host_cache in zip(device_caches, self.layers, strict=True):
            host_cache.index_copy_(0, host, device_cache.index_select(0, dev).cpu())

    def swap_in(self, device_caches: list[torch.Tensor], host_blocks: list[int],
                device_blocks: list[int]) -> None:
        """Copies host_blocks[i] to device_blocks[i], every layer."""
        if not device_blocks:
            return
        device = device_caches[0].device
        dev = torch.tensor(device_blocks, dtype=torch.int64, device=device)
        host = torch.tensor(host_blocks, dtype=torch.int64)
        for device_cache, host_cache in zip(device_caches, self.layers, strict=True):
            rows = host_cache.index_select(0, host)
            device_cache.index_copy_(0, dev, rows.to(device, non_blocking=rows.is_pinned()))


class SwapError(ValueError):
    """The plan asks for copies the worker cannot make (no host cache, bad block ids). The
    runner turns it into its PlanError (this module must not import the runner: the runner
    imports it)."""


def apply_swaps(host_cache: HostKVCache | None, device_caches: list[torch.Tensor],
                plan: BatchPlan) -> None:
    """Executes a plan's swap-outs, then its swap-ins. Call before anything else in the plan."""
    out_dev, out_host = plan.swap_out_device_blocks, plan.swap_out_host_blocks
    in_host, in_dev = plan.swap_in_host_blocks, plan.swap_in_device_blocks
    if not out_dev and not in_dev:
        return
    if host_cache is None:
        raise SwapError(f"step {plan.step_id} swaps KV blocks but this worker has no host cache")
    if len(out_dev) != len(out_host) or len(in_dev) != len(in_host):
        raise SwapError(f"step {plan.step_id}: swap block lists of different lengths")
    num_device = device_caches[0].shape[0]
    if any(not 0 <= b < num_device for b in out_dev + in_dev) or \
            any(not 0 <= b < host_cache.num_blocks for b in out_host + in_host):
        raise SwapError(f"step {plan.step_id}: a swapped block id is out of range")
    host_cache.swap_out(device_caches, out_dev, out_host)
    host_cache.swap_in(device_caches, in_host, in_dev)

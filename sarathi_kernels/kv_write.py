"""Writes this step's k and v into the paged cache at their slots; slots < 0 are skipped.

Cache layout per layer: [num_blocks, 2, block_size, kv_heads, head_dim] (K at index 0). Negative
slots mark the padding rows of a CUDA-graph batch, which must not touch the cache.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def write_kv_ref(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    block_size = kv_cache.shape[2]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    blocks, offsets = slots // block_size, slots % block_size
    kv_cache[blocks, 0, offsets] = k[keep]
    kv_cache[blocks, 1, offsets] = v[keep]


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, cache_ptr, slot_ptr, k_stride, v_stride, block_size,
                     cache_block_stride, cache_kv_stride, cache_slot_stride,
                     ROW: tl.constexpr, BLOCK: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot >= 0:
        cols = tl.arange(0, BLOCK)
        mask = cols < ROW  # kv_heads * head_dim, contiguous within a token
        dst = cache_ptr + (slot // block_size) * cache_block_stride + (slot % block_size) * cache_slot_stride
        tl.store(dst + cols, tl.load(k_ptr + tok * k_stride + cols, mask=mask), mask=mask)
        tl.store(dst + cache_kv_stride + cols, tl.load(v_ptr + tok * v_stride + cols, mask=mask),
                 mask=mask)


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v: [tokens, kv_heads, head_dim] with heads and dims contiguous (views of qkv are)."""
    n_tok, kv_heads, head_dim = k.shape
    if n_tok == 0:
        return
    assert k.stride(1) == head_dim and v.stride(1) == head_dim and k.stride(2) == 1
    row = kv_heads * head_dim
    _write_kv_kernel[(n_tok,)](
        k, v, kv_cache, slot_mapping, k.stride(0), v.stride(0), kv_cache.shape[2],
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        ROW=row, BLOCK=triton.next_power_of_2(row), num_warps=4)

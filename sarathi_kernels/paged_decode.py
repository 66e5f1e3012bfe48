"""Split-KV paged attention for decode-only batches (one query token per sequence).

At small batch a decode step has too few (sequence, KV head) pairs to fill the GPU: Llama-3-8B
at batch 1 has 8, against 132 SMs. So each pair's context is cut into `splits` contiguous
ranges, one program per range (flash-decoding); each writes its normalised partial output and
the log-sum-exp of its scores, and a second kernel merges the ranges. With one split (large
batches) the first kernel writes the output directly and no merge runs.

The grid depends only on the batch size and the split count, never on context lengths, so a
CUDA graph captured for a batch size replays for any context: each program derives its range
from the sequence's context length on the device.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from sarathi_kernels.paged_attention import attend_tile

_LOG2E = 1.4426950408889634
MAX_SPLITS = 16


# The block table's width is that of the iteration's longest table, which changes from one
# iteration to the next; specialized (Triton's 1 / multiple of 16 / other), it would compile a
# variant mid-stream the first time a hybrid iteration's eager decodes met a new class, rather
# than reuse what the decode graphs compiled at start-up (tests/gpu/test_runner_gpu.py).
@triton.jit(do_not_specialize=["table_stride"])
def _decode_split_kernel(
        q_ptr, out_ptr, part_ptr, lse_ptr, cache_ptr, tables_ptr, ctx_ptr,
        q_tok_stride, q_head_stride, o_tok_stride, o_head_stride,
        c_block_stride, c_kv_stride, c_slot_stride, c_head_stride, table_stride,
        block_size, qk_scale, num_heads,
        SPLITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr, IEEE: tl.constexpr):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(ctx_ptr + seq)
    # Ranges are whole BLOCK_N tiles, so only a range's last tile is partial.
    per_split = tl.cdiv(tl.cdiv(ctx, SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, ctx)
    g = tl.arange(0, BLOCK_G)
    g_ok = g < GROUP
    head = kvh * GROUP + g
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + seq.to(tl.int64) * q_tok_stride + head[:, None] * q_head_stride + d[None, :],
                mask=g_ok[:, None], other=0.0)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    table = tables_ptr + seq.to(tl.int64) * table_stride
    for tile in range(start, end, BLOCK_N):
        n = tile + tl.arange(0, BLOCK_N)
        n_ok = n < end
        acc, m_i, l_i = attend_tile(
            q, acc, m_i, l_i, cache_ptr, table, n, n_ok, n_ok[None, :], kvh, block_size,
            c_block_stride, c_kv_stride, c_slot_stride, c_head_stride, qk_scale, d, IEEE)
    # An empty range (context shorter than the split count's tiles) leaves l_i = 0: it writes
    # zeros and a log-sum-exp of -inf, which the merge weighs at zero.
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    if SPLITS == 1:
        tl.store(out_ptr + seq.to(tl.int64) * o_tok_stride + head[:, None] * o_head_stride + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None])
    else:
        row = (seq.to(tl.int64) * num_heads + head) * SPLITS + split  # [BLOCK_G]
        tl.store(part_ptr + row[:, None] * HEAD_DIM + d[None, :], out, mask=g_ok[:, None])
        tl.store(lse_ptr + row, tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf")),
                 mask=g_ok)


@triton.jit
def _merge_splits_kernel(part_ptr, lse_ptr, out_ptr, o_tok_stride, o_head_stride, num_heads,
                         SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    s_ok = s < SPLITS
    d = tl.arange(0, HEAD_DIM)
    row = (seq.to(tl.int64) * num_heads + head) * SPLITS + s
    lse = tl.load(lse_ptr + row, mask=s_ok, other=float("-inf"))
    top = tl.max(lse, axis=0)
    w = tl.exp2(lse - top)  # every sequence has >= 1 token, so some split has lse > -inf
    part = tl.load(part_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=s_ok[:, None], other=0.0)
    out = tl.sum(part * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + seq.to(tl.int64) * o_tok_stride + head * o_head_stride + d,
             out.to(out_ptr.dtype.element_ty))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_splits(batch: int, kv_heads: int, device: torch.device) -> int:
    """Ranges per (sequence, KV head): about four programs per SM in all, rounded down to a power
    of two, at most MAX_SPLITS, and one range once the batch alone gives that many. It depends
    on the batch size alone, so a graph can fix it. On an H200 with Llama-3-8B's 8 KV heads this
    picks 16 ranges at batch 1, 8 at batch 8 and 1 from batch 64, the best of 1/4/8/16/32 at
    each of those sizes (benchmarks/kernels/attention_decode.py).

    Powers of two because the split count is a compile-time constant: every other count is a
    Triton compile (~0.5 s) the first time a batch of that size runs, which a served hybrid
    iteration's few decodes (any count up to 16) hit mid-stream; the decode graphs' batch sizes
    1, 2, 4, 8, 16 compile every power of two in between when they are captured."""
    sms = _sm_count(device.index or 0) if device.type == "cuda" else 64
    fit = max(1, min(MAX_SPLITS, 4 * sms // (batch * kv_heads)))
    return 1 << (fit.bit_length() - 1)


def paged_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, scale: float, splits: int | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """q: [num_seqs, heads, head_dim], one query per sequence, at its last position ->
    [num_seqs, heads, head_dim]. Reads context_lens and block_tables (int32) on the device, so a
    CUDA graph replays for whatever they hold then."""
    n_seq, n_heads, head_dim = q.shape
    _, _, block_size, kv_heads, _ = kv_cache.shape
    group = n_heads // kv_heads
    if out is None:
        out = torch.empty_like(q)
    if n_seq == 0:
        return out
    if splits is None:
        splits = num_splits(n_seq, kv_heads, q.device)
    ieee = q.dtype == torch.float32
    block_n = 32 if ieee else 64
    if splits > 1:
        part = torch.empty(n_seq * n_heads * splits, head_dim, device=q.device, dtype=torch.float32)
        lse = torch.empty(n_seq * n_heads * splits, device=q.device, dtype=torch.float32)
    else:
        part = lse = out  # unused: the kernel writes out directly
    _decode_split_kernel[(n_seq, kv_heads, splits)](
        q, out, part, lse, kv_cache, block_tables, context_lens,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_tables.stride(0), block_size, scale * _LOG2E, n_heads,
        SPLITS=splits, GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n,
        HEAD_DIM=head_dim, IEEE=ieee, num_warps=4, num_stages=2)
    if splits > 1:
        _merge_splits_kernel[(n_seq, n_heads)](
            part, lse, out, out.stride(0), out.stride(1), n_heads,
            SPLITS=splits, BLOCK_S=triton.next_power_of_2(splits), HEAD_DIM=head_dim, num_warps=4)
    return out

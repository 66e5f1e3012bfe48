"""Paged attention for a ragged hybrid batch (prefill chunks and decodes in one launch).

One program owns one sequence, one KV head and a block of that sequence's query tokens; its
rows are (token, query head of the group) pairs, so K/V pages are read once per group rather
than once per query head (GQA). Keys are gathered through the block table BLOCK_N at a time,
with an online softmax in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def attend_tile(q, acc, m_i, l_i, cache_ptr, table, n, n_ok, visible, kvh, block_size,
                c_block_stride, c_kv_stride, c_slot_stride, c_head_stride, qk_scale, d,
                IEEE: tl.constexpr):
    """One BLOCK_N tile of keys n (gathered through the block table `table`) folded into the
    online softmax of q's rows: -> (acc, m_i, l_i). Scores outside `visible` count as -inf."""
    blk = tl.load(table + n // block_size, mask=n_ok, other=0).to(tl.int64)
    off = blk * c_block_stride + (n % block_size) * c_slot_stride + kvh * c_head_stride
    k = tl.load(cache_ptr + off[:, None] + d[None, :], mask=n_ok[:, None], other=0.0)
    v = tl.load(cache_ptr + c_kv_stride + off[:, None] + d[None, :], mask=n_ok[:, None], other=0.0)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = tl.where(visible, s * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


# Not specialized on the block table's width (the iteration's longest table): see paged_decode.
@triton.jit(do_not_specialize=["table_stride"])
def _paged_attention_kernel(
        q_ptr, out_ptr, cache_ptr, tables_ptr, qstart_ptr, ctx_ptr,
        q_tok_stride, q_head_stride, o_tok_stride, o_head_stride,
        c_block_stride, c_kv_stride, c_slot_stride, c_head_stride, table_stride,
        block_size, qk_scale,
        GROUP: tl.constexpr, TOK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr, IEEE: tl.constexpr):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    qb = tl.program_id(2)
    q_start = tl.load(qstart_ptr + seq)
    q_len = tl.load(qstart_ptr + seq + 1) - q_start
    if qb * TOK < q_len:
        ctx = tl.load(ctx_ptr + seq)
        r = tl.arange(0, BLOCK_M)
        tok = qb * TOK + r // GROUP
        head = kvh * GROUP + r % GROUP
        row_ok = (r < TOK * GROUP) & (tok < q_len)
        q_pos = ctx - q_len + tok
        d = tl.arange(0, HEAD_DIM)
        q_rows = (q_start + tok).to(tl.int64)
        q = tl.load(q_ptr + q_rows[:, None] * q_tok_stride + head[:, None] * q_head_stride + d[None, :],
                    mask=row_ok[:, None], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        # Keys past this block's last query position are masked for every row: stop there.
        last_tok = tl.minimum(qb * TOK + TOK, q_len)
        kv_end = ctx - q_len + last_tok
        table = tables_ptr + seq.to(tl.int64) * table_stride
        for start in range(0, kv_end, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            n_ok = n < kv_end
            visible = (n[None, :] <= q_pos[:, None]) & n_ok[None, :]
            acc, m_i, l_i = attend_tile(
                q, acc, m_i, l_i, cache_ptr, table, n, n_ok, visible, kvh, block_size,
                c_block_stride, c_kv_stride, c_slot_stride, c_head_stride, qk_scale, d, IEEE)
        out = acc / l_i[:, None]
        tl.store(out_ptr + q_rows[:, None] * o_tok_stride + head[:, None] * o_head_stride + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                    query_start: torch.Tensor, context_lens: torch.Tensor, scale: float,
                    max_query_len: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """q: [tokens, heads, head_dim] (head_dim contiguous) -> [tokens, heads, head_dim].

    Sequence i owns query rows [query_start[i], query_start[i + 1]), the last positions of its
    context_lens[i] tokens, whose K/V sit in the blocks of row i of block_tables (all int32, on
    the device). max_query_len (a host int) sizes the grid, so the launch needs no device sync.
    """
    n_tok, n_heads, head_dim = q.shape
    _, _, block_size, kv_heads, _ = kv_cache.shape
    group = n_heads // kv_heads
    if out is None:
        out = torch.empty(n_tok, n_heads, head_dim, device=q.device, dtype=q.dtype)
    num_seqs = context_lens.shape[0]
    if n_tok == 0 or num_seqs == 0:
        return out
    rows = 16 if max_query_len == 1 else 64
    block_m = max(rows, triton.next_power_of_2(group))
    tok = block_m // group
    ieee = q.dtype == torch.float32
    block_n = 32 if ieee else 64
    grid = (num_seqs, kv_heads, triton.cdiv(max_query_len, tok))
    _paged_attention_kernel[grid](
        q, out, kv_cache, block_tables, query_start, context_lens,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_tables.stride(0), block_size, scale * _LOG2E,
        GROUP=group, TOK=tok, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=head_dim, IEEE=ieee,
        num_warps=4, num_stages=2)
    return out

"""Skinny matmul for decode: y = x @ W^T (+ b) with few rows in x (a small decode batch).

At batch 1-8 a decode step's projections only stream their weights; cuBLAS's kernels for this
shape read them at about 2.4-2.9 TB/s on an H100, short of what the memory gives. Here each
program owns BLOCK_N output columns, streams W's rows through a pipelined loop over K, and
multiplies on the tensor cores with x padded to 16 rows (x is tiny and stays in cache).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

MAX_ROWS = 16   # rows of x this kernel takes; larger batches go to cuBLAS


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN_K: tl.constexpr):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, 16)
    rk = tl.arange(0, BLOCK_K)
    n_ok = rn < N
    w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :]
    x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]
    acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs, mask=n_ok[:, None], other=0.0)
            x = tl.load(x_ptrs, mask=rm[:, None] < M, other=0.0)
        else:
            k_ok = (k0 + rk) < K
            w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            x = tl.load(x_ptrs, mask=(rm[:, None] < M) & k_ok[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(w))
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rm[:, None] < M) & n_ok[None, :])


def pick_config(n: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) for an [n, k] weight: the winners of
    benchmarks/kernels/gemv_sweep.py on an H100 for Llama-3-8B's shapes, by the shape class they stand for."""
    if n >= 65536:       # LM heads
        return (32, 512, 4, 5)
    if k >= 8192:        # down projections: long rows
        return (32, 256, 4, 5)
    if n >= 16384:       # gate_up
        return (32, 128, 4, 3)
    if n <= k:           # square-ish: o_proj
        return (32, 256, 4, 3)
    return (64, 128, 4, 5)   # qkv


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """x: [M <= 16, K], weight: [N, K] (rows contiguous) -> [M, N] in x's dtype."""
    m, k = x.shape
    n = weight.shape[0]
    assert m <= MAX_ROWS and weight.shape[1] == k and weight.stride(1) == 1
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    block_n, block_k, warps, stages = config or pick_config(n, k)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else weight, out, m, n, k, x.stride(0),
        weight.stride(0), out.stride(0), HAS_BIAS=bias is not None, BLOCK_N=block_n,
        BLOCK_K=block_k, EVEN_K=k % block_k == 0, num_warps=warps, num_stages=stages)
    return out

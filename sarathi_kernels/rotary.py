"""Rotary position embedding (rotate-half / NeoX form) applied in place to q and k.

q and k are usually strided views into the fused qkv projection's output: the kernel writes
them where they are, so no copy is made and the KV write reads the rotated k directly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def rotary_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, H, D], k: [T, KH, D]; cos/sin: [max_pos, D] float32 (halves repeated)."""
    c = cos[positions].unsqueeze(1)
    s = sin[positions].unsqueeze(1)

    def rot(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        x32 = x.float()
        rotated = torch.cat((-x32[..., half:], x32[..., :half]), dim=-1)
        return (x32 * c + rotated * s).to(x.dtype)

    return rot(q), rot(k)


@triton.jit
def _rotary_kernel(x_ptr, pos_ptr, cos_ptr, sin_ptr, n_heads, tok_stride, head_stride, cos_stride,
                   HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, HALF)
    pos = tl.load(pos_ptr + tok)
    c = tl.load(cos_ptr + pos * cos_stride + dims)
    s = tl.load(sin_ptr + pos * cos_stride + dims)
    base = x_ptr + tok * tok_stride + heads[:, None] * head_stride + dims[None, :]
    mask = heads[:, None] < n_heads
    x1 = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF, mask=mask, other=0.0).to(tl.float32)
    ty = x_ptr.dtype.element_ty
    tl.store(base, (x1 * c[None, :] - x2 * s[None, :]).to(ty), mask=mask)
    tl.store(base + HALF, (x2 * c[None, :] + x1 * s[None, :]).to(ty), mask=mask)


def _rotate_(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    n_tok, n_heads, head_dim = x.shape
    if n_tok == 0:
        return
    assert x.stride(2) == 1 and cos.stride(1) == 1, "last dim must be contiguous"
    block_h = min(triton.next_power_of_2(n_heads), 8)
    _rotary_kernel[(n_tok, triton.cdiv(n_heads, block_h))](
        x, positions, cos, sin, n_heads, x.stride(0), x.stride(1), cos.stride(0),
        HALF=head_dim // 2, BLOCK_H=block_h, num_warps=2)


def rotary_(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
            sin: torch.Tensor) -> None:
    """In place; same arguments as rotary_ref (head_dim / 2 must be a power of two)."""
    _rotate_(q, positions, cos, sin)
    _rotate_(k, positions, cos, sin)


@triton.jit
def _rotary_cache_kernel(q_ptr, k_ptr, v_ptr, q_out_ptr, pos_ptr, cos_ptr, sin_ptr, cache_ptr, slot_ptr,
                         n_heads, n_kv_heads, q_stride, k_stride, v_stride, q_out_stride, cos_stride,
                         block_size, c_block_stride, c_kv_stride, c_slot_stride,
                         HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_KH: tl.constexpr):
    """One program per token: rotate its q heads into q_out (q itself when in place) and its k
    heads in place, then store k and v at its slot."""
    tok = tl.program_id(0).to(tl.int64)
    dims = tl.arange(0, HALF)
    pos = tl.load(pos_ptr + tok)
    c = tl.load(cos_ptr + pos * cos_stride + dims)[None, :]
    s = tl.load(sin_ptr + pos * cos_stride + dims)[None, :]
    ty = q_ptr.dtype.element_ty
    heads = tl.arange(0, BLOCK_H)
    qb = q_ptr + tok * q_stride + heads[:, None] * (2 * HALF) + dims[None, :]
    qm = heads[:, None] < n_heads
    q1 = tl.load(qb, mask=qm, other=0.0).to(tl.float32)
    q2 = tl.load(qb + HALF, mask=qm, other=0.0).to(tl.float32)
    qo = q_out_ptr + tok * q_out_stride + heads[:, None] * (2 * HALF) + dims[None, :]
    tl.store(qo, (q1 * c - q2 * s).to(ty), mask=qm)
    tl.store(qo + HALF, (q2 * c + q1 * s).to(ty), mask=qm)
    kh = tl.arange(0, BLOCK_KH)
    row = kh[:, None] * (2 * HALF) + dims[None, :]
    km = kh[:, None] < n_kv_heads
    kb = k_ptr + tok * k_stride + row
    k1 = tl.load(kb, mask=km, other=0.0).to(tl.float32)
    k2 = tl.load(kb + HALF, mask=km, other=0.0).to(tl.float32)
    r1 = (k1 * c - k2 * s).to(ty)
    r2 = (k2 * c + k1 * s).to(ty)
    tl.store(kb, r1, mask=km)
    tl.store(kb + HALF, r2, mask=km)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot >= 0:  # negative: a CUDA-graph padding row, which must not touch the cache
        dst = cache_ptr + (slot // block_size) * c_block_stride + (slot % block_size) * c_slot_stride + row
        tl.store(dst, r1, mask=km)
        tl.store(dst + HALF, r2, mask=km)
        vb = v_ptr + tok * v_stride + row
        tl.store(dst + c_kv_stride, tl.load(vb, mask=km), mask=km)
        tl.store(dst + c_kv_stride + HALF, tl.load(vb + HALF, mask=km), mask=km)


def rotary_and_cache_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                      cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                      slot_mapping: torch.Tensor, q_out: torch.Tensor | None = None) -> torch.Tensor:
    """rotary_ on q and k, then kv_write.write_kv of (rotated k, v), in one launch. Returns the
    rotated q: q itself, or q_out where given (q is then left as it was). Writing q out costs
    the same as in place, and hands attention a packed q (q from the qkv output is strided).

    q: [T, H, D], k, v: [T, KH, D] with heads and dims contiguous (views of the qkv output are);
    q_out: like q; kv_cache: [num_blocks, 2, block_size, KH, D] contiguous.
    """
    n_tok, n_heads, head_dim = q.shape
    n_kv = k.shape[1]
    q_out = q if q_out is None else q_out
    if n_tok == 0:
        return q_out
    for t in (q, k, v, q_out):
        assert t.stride(2) == 1 and t.stride(1) == head_dim, "heads and dims must be packed"
    assert q_out.shape == q.shape and kv_cache.is_contiguous() and cos.stride(1) == 1
    _rotary_cache_kernel[(n_tok,)](
        q, k, v, q_out, positions, cos, sin, kv_cache, slot_mapping, n_heads, n_kv,
        q.stride(0), k.stride(0), v.stride(0), q_out.stride(0), cos.stride(0), kv_cache.shape[2],
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        HALF=head_dim // 2, BLOCK_H=triton.next_power_of_2(n_heads),
        BLOCK_KH=triton.next_power_of_2(n_kv), num_warps=4)
    return q_out

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

"""RMSNorm fused with the residual add: one read of x and residual, one write of each output.

Unfused, a decoder layer reads the hidden state three times around each norm (add, square-mean,
scale); fused, it is one pass, which matters at decode where these are memory-bound.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def fused_add_rmsnorm_ref(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rmsnorm(x + residual) * weight, x + residual); residual None means zero."""
    total = x if residual is None else x + residual
    t32 = total.float()
    normed = t32 * torch.rsqrt(t32.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * weight.float()).to(x.dtype), total


@triton.jit
def _add_rmsnorm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_cols, eps,
                        x_stride, res_stride, out_stride, res_out_stride,
                        HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # Round the sum to the activation dtype, as the unfused add would.
        x = x + tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0)
        tl.store(res_out_ptr + row * res_out_stride + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * out_stride + cols, (x32 * inv * w).to(out_ptr.dtype.element_ty), mask=mask)


def fused_add_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                      eps: float, residual_out: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [tokens, hidden] (row-contiguous). Same contract as fused_add_rmsnorm_ref.
    residual_out: where x + residual goes (residual itself is fine: each row is read before it
    is written), e.g. a CUDA graph's static buffer; None for a new tensor (x without residual)."""
    n_rows, n_cols = x.shape
    out = torch.empty_like(x)
    if residual is None and residual_out is not None:
        residual_out.copy_(x)
    res_out = residual_out if residual_out is not None else torch.empty_like(x) if residual is not None else x
    if n_rows == 0:
        return out, res_out
    block = triton.next_power_of_2(n_cols)
    res = residual if residual is not None else x
    _add_rmsnorm_kernel[(n_rows,)](
        x, res, weight, out, res_out, n_cols, eps,
        x.stride(0), res.stride(0), out.stride(0), res_out.stride(0),
        HAS_RESIDUAL=residual is not None, BLOCK=block,
        num_warps=min(max(block // 256, 1), 16))
    return out, res_out

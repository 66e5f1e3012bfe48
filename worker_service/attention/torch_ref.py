"""Reference paged attention in plain torch: runs anywhere, and is what GPU kernels are tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from worker_service.attention.backend import AttentionBackend, AttentionMetadata


class TorchAttention(AttentionBackend):
    def write_kv(self, kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 meta: AttentionMetadata) -> None:
        num_blocks, _, block_size, kv_heads, head_dim = kv_cache.shape
        flat = kv_cache.view(num_blocks, 2, block_size, kv_heads, head_dim)
        blocks = meta.slot_mapping // block_size
        offsets = meta.slot_mapping % block_size
        flat[blocks, 0, offsets] = k
        flat[blocks, 1, offsets] = v

    def forward(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
        block_size = meta.block_size
        out = torch.empty_like(q) if out is None else out
        starts = meta.query_start_host
        for i, ctx in enumerate(meta.context_lens_host):
            q_i = q[starts[i]:starts[i + 1]]
            n = q_i.shape[0]
            num_blocks = (ctx + block_size - 1) // block_size
            blocks = meta.block_tables[i, :num_blocks].long()
            kv = kv_cache[blocks]                     # [nb, 2, bs, kvh, d]
            k = kv[:, 0].reshape(-1, *kv.shape[-2:])[:ctx]
            v = kv[:, 1].reshape(-1, *kv.shape[-2:])[:ctx]
            # Query j sits at position ctx - n + j and sees keys up to it.
            mask = None
            if n > 1:
                q_pos = torch.arange(ctx - n, ctx, device=q.device).unsqueeze(1)
                mask = torch.arange(ctx, device=q.device).unsqueeze(0) <= q_pos
            o = F.scaled_dot_product_attention(
                q_i.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                attn_mask=mask, scale=scale, enable_gqa=True,
            )
            out[starts[i]:starts[i + 1]] = o.transpose(0, 1)
        return out

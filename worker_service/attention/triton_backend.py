"""Our own Triton kernels (sarathi_kernels/) behind the attention interface, for when FlashInfer is absent."""

from __future__ import annotations

import torch

from sarathi_kernels.kv_write import write_kv
from sarathi_kernels.paged_attention import paged_attention
from sarathi_kernels.paged_decode import paged_decode
from worker_service.attention.backend import AttentionBackend, AttentionMetadata


class TritonAttention(AttentionBackend):
    writes_kv_by_slot = True

    def __init__(self) -> None:
        self._max_query_len = 1

    def begin_iteration(self, meta: AttentionMetadata) -> None:
        # Read from the host copy once here, so no layer syncs to size its grid.
        self._max_query_len = meta.max_query_len

    def write_kv(self, kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 meta: AttentionMetadata) -> None:
        write_kv(kv_cache, k, v, meta.slot_mapping)

    def forward(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
        if meta.num_decode_only:
            return paged_decode(q, kv_cache, meta.block_tables, meta.context_lens, scale, out=out)
        return paged_attention(q, kv_cache, meta.block_tables, meta.query_start, meta.context_lens,
                               scale, self._max_query_len, out=out)

"""The attention interface every backend implements, and the per-iteration metadata it reads.

KV cache layout (per layer, FlashInfer's NHD layout): [num_blocks, 2, block_size, kv_heads, head_dim]
where index 0 of dim 1 is K and 1 is V. A token at position p of a sequence lives in block
block_table[p // block_size], offset p % block_size; its slot is block * block_size + offset.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from worker_service.upload import upload


@dataclass
class AttentionMetadata:
    """Everything attention needs for one iteration; built once, shared by all layers.

    The batch is ragged: sequence i owns query rows [query_start[i], query_start[i + 1]), which
    are the last num_query(i) positions of its context of context_lens[i] tokens.
    """

    query_start: torch.Tensor      # [num_seqs + 1] int32, cumulative query lengths
    context_lens: torch.Tensor     # [num_seqs] int32, tokens in KV after this step's writes
    block_tables: torch.Tensor     # [num_seqs, max_blocks] int32, padded with 0
    slot_mapping: torch.Tensor     # [num_tokens] int64, where each new token's K/V goes
    block_size: int
    # Host copies, so the reference path need not sync the device per sequence.
    query_start_host: list[int]
    context_lens_host: list[int]
    num_decode_only: bool = False  # every sequence has exactly one query token
    # > 0 while a CUDA graph of this many (padded) decode rows is captured or replayed: the
    # backend must then read only buffers that stay at fixed addresses for that batch size.
    graph_batch_size: int = 0

    @classmethod
    def from_host(cls, query_start: list[int], context_lens: list[int], tables: list[list[int]],
                  slots: list[int], block_size: int, device: torch.device) -> AttentionMetadata:
        """An iteration's metadata from host lists (block tables padded to the longest), its
        tensors uploaded without waiting for the device."""
        width = max(len(t) for t in tables)
        return cls(
            query_start=upload(query_start, torch.int32, device),
            context_lens=upload(context_lens, torch.int32, device),
            block_tables=upload([t + [0] * (width - len(t)) for t in tables], torch.int32, device),
            slot_mapping=upload(slots, torch.int64, device), block_size=block_size,
            query_start_host=query_start, context_lens_host=context_lens,
            num_decode_only=query_start[-1] == len(context_lens))

    @property
    def max_query_len(self) -> int:
        starts = self.query_start_host
        return max((b - a for a, b in zip(starts, starts[1:], strict=False)), default=0)


class AttentionBackend(ABC):
    """Computes attention for a ragged hybrid batch over the paged KV cache of one layer."""

    # True when write_kv is exactly sarathi_kernels.kv_write's slot-mapping store (negative slots
    # skipped): the model may then fuse the store into its rotary kernel and skip write_kv.
    writes_kv_by_slot = False

    def configure(self, num_heads: int, num_kv_heads: int, head_dim: int,  # noqa: B027
                  dtype: torch.dtype) -> None:
        """Called once by the runner with the model's attention shape (optional hook)."""

    def begin_iteration(self, meta: AttentionMetadata) -> None:  # noqa: B027 - optional hook
        """Called by the runner once per iteration before the first layer (e.g. to plan GPU
        kernels); never inside a CUDA-graph capture, so it may do host work."""

    def graph_prologue(self, meta: AttentionMetadata) -> None:  # noqa: B027 - optional hook
        """Captured at the start of a CUDA graph (meta.graph_batch_size > 0), so it runs on the
        device at every replay: derive per-iteration tensors from the static buffers here
        rather than on the host in begin_iteration."""

    @abstractmethod
    def write_kv(self, kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 meta: AttentionMetadata) -> None:
        """Stores this step's k, v ([num_tokens, kv_heads, head_dim]) at meta.slot_mapping."""

    @abstractmethod
    def forward(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
        """q: [num_tokens, heads, head_dim] -> [num_tokens, heads, head_dim], causal per sequence.
        out: a contiguous tensor of q's shape to write into (a graph's static buffer), or None."""

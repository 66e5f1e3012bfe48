"""An iteration as two nano-batches on two CUDA streams, so that one half's memory-bound attention
can run while the other half's GEMMs hold the tensor cores (NanoFlow's overlap).

Kernel by kernel, an iteration costs its GEMMs plus its decodes' attention; side by side it could
cost less than that sum (issue 22). Each nano-batch is some of the iteration's sequences, whole:
their rows are independent of the other half's at every layer, so the two need no
synchronisation but a fork before the first layer and a join after the last. Each has its own
attention backend, planned for its rows. The layers run eagerly, issued in turn (A's layer i,
B's layer i, ...): only iterations whose device time far exceeds their launches should take this
path (`min_tokens`). benchmarks/step/nano_batch.py measures the same split on whole iterations.
"""

from __future__ import annotations

import contextlib

import torch

from worker_service.attention import AttentionBackend, AttentionMetadata
from worker_service.host_batch import HostBatch
from worker_service.models.llama import LlamaModel
from worker_service.upload import upload


def split_sequences(query_start: list[int]) -> tuple[list[int], list[int]] | None:
    """Sequence indices of the two nano-batches: half the decodes, with every prefill chunk, in
    the first; the other half of the decodes in the second (None: fewer than two decodes)."""
    decodes = sum(1 for a, b in zip(query_start, query_start[1:], strict=False) if b - a == 1)
    if decodes < 2:
        return None
    half = decodes // 2
    return list(range(half)) + list(range(decodes, len(query_start) - 1)), list(range(half, decodes))


class NanoBatches:
    """Runs the model over an iteration as two nano-batches, each on its own stream."""

    def __init__(self, model: LlamaModel, backends: tuple[AttentionBackend, AttentionBackend],
                 device: torch.device, dtype: torch.dtype, min_tokens: int, block_size: int) -> None:
        c = model.config
        for backend in backends:
            backend.configure(c.num_heads, c.num_kv_heads, c.head_dim, dtype)
        self.model, self.backends, self.device = model, backends, device
        self.min_tokens, self.block_size = min_tokens, block_size
        # The second holds decodes only: its memory-bound attention goes first when both wait.
        # (None: the current stream, as on the CPU.)
        self.streams: tuple[torch.cuda.Stream | None, torch.cuda.Stream | None] = (None, None)
        if device.type == "cuda":
            self.streams = (torch.cuda.Stream(device), torch.cuda.Stream(device, priority=-1))

    def split(self, rows: HostBatch) -> tuple[list[int], list[int]] | None:
        if rows.query_start[-1] < self.min_tokens:
            return None
        return split_sequences(rows.query_start)

    def plan(self, rows: HostBatch, parts: tuple[list[int], list[int]]) -> list[_Part]:
        """Each nano-batch's token rows, inputs and metadata, its backend planned (host work,
        before the iteration's first kernel)."""
        out = []
        for seqs, backend in zip(parts, self.backends, strict=True):
            part = _Part(rows, seqs, self.device, self.block_size, backend)
            backend.begin_iteration(part.meta)
            out.append(part)
        return out

    def run(self, parts: list[_Part], input_ids: torch.Tensor, kv_caches: list[torch.Tensor]
            ) -> torch.Tensor:
        """Hidden states [tokens, hidden] in the iteration's row order."""
        m = self.model
        streams = [s for s in self.streams if s is not None]
        main = torch.cuda.current_stream(self.device) if streams else None
        for part in parts:
            part.x, part.residual = m.embed_tokens(input_ids[part.token_rows]), None
        for stream in streams:
            stream.wait_stream(main)
        for layer, cache in zip(m.layers, kv_caches, strict=True):
            for part, stream in zip(parts, self.streams, strict=True):
                with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                    q, part.residual = layer.begin(part.x, part.residual, part.positions, m.rotary,
                                                   cache, part.meta)
                    attn = part.backend.forward(q, cache, part.meta, layer.attn.scale)
                    part.x, part.residual = layer.end(attn, part.residual)
        for stream in streams:
            main.wait_stream(stream)
        hidden = torch.empty(input_ids.shape[0], m.config.hidden_size, dtype=parts[0].x.dtype,
                             device=self.device)
        for part in parts:
            hidden[part.token_rows] = part.x + part.residual
        return hidden


class _Part:
    """One nano-batch of an iteration."""

    def __init__(self, rows: HostBatch, seqs: list[int], device: torch.device, block_size: int,
                 backend: AttentionBackend) -> None:
        qs = rows.query_start
        token_rows = [t for s in seqs for t in range(qs[s], qs[s + 1])]
        starts = [0]
        for s in seqs:
            starts.append(starts[-1] + qs[s + 1] - qs[s])
        self.token_rows = upload(token_rows, torch.int64, device)
        self.positions = upload([rows.positions[t] for t in token_rows], torch.int64, device)
        self.meta = AttentionMetadata.from_host(
            starts, [rows.context_lens[s] for s in seqs], [rows.tables[s] for s in seqs],
            [rows.slots[t] for t in token_rows], block_size, device)
        self.backend = backend
        self.x: torch.Tensor | None = None
        self.residual: torch.Tensor | None = None

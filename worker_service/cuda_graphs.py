"""CUDA graphs for decode-only iterations: one graph per padded batch size, sharing one pool.

A decode step of a small batch is a few hundred short kernels; launched one by one from Python
the GPU idles between them. Captured once per batch size and replayed, the launches cost one.
Inputs live in static buffers that every replay overwrites; padding rows write no KV (slot -1)
and attend to one cached token, and their logits are dropped. Attention planning (host work)
runs before each replay through the backend's begin_iteration, never inside the graph.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from worker_service.attention import AttentionBackend, AttentionMetadata
from worker_service.models.llama import LlamaModel
from worker_service.upload import upload

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)

_capture_stream: torch.cuda.Stream | None = None


@contextmanager
def capturing(graph: torch.cuda.CUDAGraph, pool: tuple[int, int] | None) -> Iterator[None]:
    """Captures what runs inside into `graph` (in `pool`), on a side stream. It is
    torch.cuda.graph without the housekeeping that precedes its every capture (a device-wide
    synchronize, emptying the device and pinned-host allocator caches, in some versions
    gc.collect): the hybrid graphs are some 800 captures in a row, and the caller synchronizes
    after each warm-up already. Nothing must be pending on other streams that the capture reads."""
    global _capture_stream
    if _capture_stream is None:
        _capture_stream = torch.cuda.Stream()
    with torch.cuda.stream(_capture_stream):
        graph.capture_begin(pool)
        try:
            yield
        finally:
            graph.capture_end()


class DecodeGraphs:
    def __init__(self, model: LlamaModel, backend: AttentionBackend, kv_caches: list[torch.Tensor],
                 block_size: int, max_blocks_per_seq: int, device: torch.device,
                 batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES) -> None:
        self.model, self.backend, self.kv_caches = model, backend, kv_caches
        self.block_size = block_size
        self.batch_sizes = tuple(sorted(batch_sizes))
        n = self.batch_sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slots = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.query_start = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # Per row: (the block-table list last copied there, how many of its entries). Holding
        # the list keeps its identity unique; tables only grow, so a step copies new entries.
        self._rows: list[tuple[list[int], int] | None] = [None] * n
        self.pool = None

    @property
    def max_batch(self) -> int:
        return self.batch_sizes[-1]

    def _meta(self, batch: int, context_lens: list[int]) -> AttentionMetadata:
        return AttentionMetadata(
            query_start=self.query_start[:batch + 1], context_lens=self.context_lens[:batch],
            block_tables=self.block_tables[:batch], slot_mapping=self.slots[:batch],
            block_size=self.block_size, query_start_host=list(range(batch + 1)),
            context_lens_host=context_lens, num_decode_only=True, graph_batch_size=batch)

    def capture(self) -> None:
        """Largest first, so smaller graphs reuse the pool's blocks."""
        for batch in reversed(self.batch_sizes):
            meta = self._meta(batch, [1] * batch)
            self.backend.begin_iteration(meta)
            args = (self.input_ids[:batch], self.positions[:batch], self.kv_caches, meta)
            for _ in range(2):  # compile and autotune outside the capture
                self.backend.graph_prologue(meta)
                self.model.compute_logits(self.model(*args))
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with capturing(graph, self.pool):
                self.backend.graph_prologue(meta)
                logits = self.model.compute_logits(self.model(*args))
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[batch] = (graph, logits)
        torch.cuda.synchronize()

    def padded_size(self, batch: int) -> int | None:
        return next((b for b in self.batch_sizes if b >= batch), None)

    def _update_tables(self, tables: list[list[int]]) -> None:
        rows: list[int] = []
        cols: list[int] = []
        values: list[int] = []
        for i, table in enumerate(tables):
            known = self._rows[i]
            start = known[1] if known is not None and known[0] is table else 0
            if start < len(table):
                rows.extend([i] * (len(table) - start))
                cols.extend(range(start, len(table)))
                values.extend(table[start:])
                self._rows[i] = (table, len(table))
        if values:
            dev = self.block_tables.device
            update = upload([rows, cols, values], torch.int64, dev)
            self.block_tables[update[0], update[1]] = update[2].to(torch.int32)

    def load(self, input_ids: list[int], positions: list[int], slots: list[int],
             context_lens: list[int], tables: list[list[int]]) -> int:
        """One decode row per sequence into the static buffers, and the attention plan;
        returns the padded batch size to replay."""
        batch = len(input_ids)
        padded = self.padded_size(batch)
        assert padded is not None, "batch too large for the captured graphs"
        pad = padded - batch
        dev = upload([input_ids + [0] * pad, positions + [0] * pad, slots + [-1] * pad,
                      context_lens + [1] * pad], torch.int64, self.input_ids.device)
        self.input_ids[:padded].copy_(dev[0])
        self.positions[:padded].copy_(dev[1])
        self.slots[:padded].copy_(dev[2])
        self.context_lens[:padded].copy_(dev[3])
        self._update_tables(tables)
        self.backend.begin_iteration(self._meta(padded, context_lens + [1] * pad))
        return padded

    def replay(self, padded: int, batch: int) -> torch.Tensor:
        """-> logits [batch, vocab] float32, valid until the next replay."""
        graph, logits = self.graphs[padded]
        graph.replay()
        return logits[:batch]


def hybrid_buckets(max_tokens: int) -> tuple[int, ...]:
    """Token counts to capture hybrid graphs for: every 64 up to 1024, then every 128. A step
    is padded to the next one, and padding rows cost their full share of every matmul (at most
    12%; with steps of 256 above 512, a 576-token step ran as 768, 15% slower than eager on
    an H200)."""
    top = max(max_tokens, 64)
    sizes = list(range(64, 1025, 64)) + list(range(1152, top + 128, 128))
    return tuple(t for t in sizes if t <= top) or (64,)


class HybridGraphs:
    """Piecewise CUDA graphs for iterations that carry prefill chunks (any mix of chunks and
    decodes, up to max_tokens tokens in all).

    The batch layout of a hybrid iteration changes every step, which only attention cares
    about; everything else sees a [tokens, hidden] matrix. So the model runs as num_layers + 1
    graphs per padded token count, cut at each attention call, and attention runs eagerly
    between them on the real tokens. Graph k (k >= 1) ends layer k-1 (o_proj, norm, MLP) and
    begins layer k (norm, q/k/v, rotary, KV store); data crosses between graphs only through
    static buffers, so all graphs share one memory pool. Padding rows have slot -1 (no KV
    write) and are never read back. Without capture (CPU, tests) the same pieces run eagerly.
    """

    def __init__(self, model: LlamaModel, kv_caches: list[torch.Tensor], block_size: int,
                 device: torch.device, max_tokens: int, capture: bool) -> None:
        self.model, self.kv_caches, self.block_size = model, kv_caches, block_size
        self.buckets = hybrid_buckets(max_tokens)
        self.capture_graphs = capture
        c = model.config
        n = self.buckets[-1]
        dtype = model.embed_tokens.weight.dtype
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slots = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.q = torch.zeros(n, c.num_heads, c.head_dim, dtype=dtype, device=device)
        self.attn = torch.zeros(n, c.num_heads, c.head_dim, dtype=dtype, device=device)
        self.residual = torch.zeros(n, c.hidden_size, dtype=dtype, device=device)
        self.hidden = torch.zeros(n, c.hidden_size, dtype=dtype, device=device)
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.pool = None
        # What the pieces read of the metadata: the static slot mapping (project only).
        zeros = self.slots.new_zeros(2, dtype=torch.int32)
        self._metas = {t: AttentionMetadata(
            query_start=zeros, context_lens=zeros[:1], block_tables=zeros[:1].view(1, 1),
            slot_mapping=self.slots[:t], block_size=block_size, query_start_host=[0, t],
            context_lens_host=[t]) for t in self.buckets}

    @property
    def max_tokens(self) -> int:
        return self.buckets[-1]

    def _piece(self, k: int, tokens: int) -> None:
        """Graph k's work on the first `tokens` rows of the static buffers."""
        m, meta = self.model, self._metas[tokens]
        positions = self.positions[:tokens]
        # The residual stream is updated in place in its static buffer, and q is written
        # straight into its own: no copies between pieces.
        residual = self.residual[:tokens]
        if k == 0:
            x = m.embed_tokens(self.input_ids[:tokens])
        else:
            x, _ = m.layers[k - 1].end(self.attn[:tokens], residual, residual_out=residual)
        if k == len(m.layers):
            torch.add(x, residual, out=self.hidden[:tokens])
            return
        m.layers[k].begin(x, residual if k else None, positions, m.rotary, self.kv_caches[k], meta,
                          residual_out=residual, q_out=self.q[:tokens])

    def capture(self) -> None:
        """Largest bucket first, every piece in order, all in one pool. Slots are -1 meanwhile,
        so the warm-up runs write no KV. Pieces 1 to L-1 (end of one layer, start of the next)
        run the same kernels on the same shapes, so piece 1's warm-up serves them all."""
        self.slots.fill_(-1)
        last = len(self.model.layers)
        for tokens in reversed(self.buckets):
            graphs = []
            for k in range(last + 1):
                if k <= 1 or k == last:
                    for _ in range(2):  # compile and autotune outside the capture
                        self._piece(k, tokens)
                    torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with capturing(graph, self.pool):
                    self._piece(k, tokens)
                if self.pool is None:
                    self.pool = graph.pool()
                graphs.append(graph)
            self.graphs[tokens] = graphs
        torch.cuda.synchronize()

    def padded_size(self, tokens: int) -> int | None:
        return next((b for b in self.buckets if b >= tokens), None)

    def load(self, input_ids: torch.Tensor, positions: list[int], slots: list[int]) -> int:
        """This step's tokens into the static buffers (input_ids already on the device, since
        some may be tokens still in flight); returns the padded token count."""
        n = input_ids.shape[0]
        padded = self.padded_size(n)
        assert padded is not None, "too many tokens for the hybrid graphs"
        pad = padded - n
        dev = upload([positions + [0] * pad, slots + [-1] * pad], torch.int64, self.slots.device)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:padded].copy_(dev[0])
        self.slots[:padded].copy_(dev[1])
        return padded

    def run(self, padded: int, tokens: int, meta: AttentionMetadata) -> torch.Tensor:
        """The model over the loaded tokens, attention planned for `meta` (the real batch) ->
        hidden states [tokens, hidden], valid until the next run."""
        layers = self.model.layers
        graphs = self.graphs.get(padded) if self.capture_graphs else None
        for k in range(len(layers) + 1):
            if k > 0:  # straight into the static buffer the next graph reads
                layers[k - 1].attn.attend(self.q[:tokens], self.kv_caches[k - 1], meta,
                                          out=self.attn[:tokens])
            if graphs is not None:
                graphs[k].replay()
            else:
                self._piece(k, padded)
        return self.hidden[:tokens]

"""FlashInfer paged attention: one plan per iteration, reused by every layer.

Hybrid iterations (any prefill chunk) run their decodes (the leading one-token rows: the runner
orders them first) through the decode kernels below and their chunks through
BatchPrefillWithPagedKVCacheWrapper, two launches per layer, both planned once per iteration;
one prefill launch over both gives every decode a query tile of its own, mostly padding (on an
H200, 512-token chunk + 64 decodes: 23.3 ms against 17.4; 2048 + 128 decodes at context 4096:
121 ms against 68; benchmarks/step/gpu_bench.py). Decode-only iterations go through
the decode wrapper (tensor-core variant, which suits GQA groups), except small ones: at most
`split_decode_max_batch` sequences go to our split-KV Triton kernel (sarathi_kernels/paged_decode.py),
which spreads one sequence's context over the whole GPU in fewer, cheaper launches than
FlashInfer's split-and-merge at that size (benchmarks/kernels/attention_decode.py). CUDA-graph
decode batches get a decode wrapper of their own per padded batch size, whose index buffers stay
at fixed addresses so that planning before a replay updates what the captured kernels read.
K/V are written by our Triton kernel (slot mapping; negative slots are graph padding).
`triton_chunk_max_tokens` (off by default) sends short chunks to our Triton prefill kernel
instead, for measuring it served (benchmarks/step/gpu_bench.py,
benchmarks/kernels/chunk_attention.py). FlashInfer's POD-Attention (chunks and decodes in one
launch sharing the SMs) was measured served on an H200 and gained nothing (benchmarks/README.md),
so hybrid iterations keep two launches per layer.
"""

from __future__ import annotations

import flashinfer
import torch

from sarathi_kernels.kv_write import write_kv
from sarathi_kernels.paged_attention import paged_attention
from sarathi_kernels.paged_decode import paged_decode
from worker_service.attention.backend import AttentionBackend, AttentionMetadata
from worker_service.upload import pinned_tensor, upload

_WORKSPACE_BYTES = 256 << 20
SPLIT_DECODE_MAX_BATCH = 16


class FlashInferAttention(AttentionBackend):
    writes_kv_by_slot = True

    def __init__(self, device: torch.device, decode_tensor_cores: bool = True,
                 split_decode_max_batch: int = SPLIT_DECODE_MAX_BATCH,
                 hybrid_decode_kernels: bool = True) -> None:
        """decode_tensor_cores: decodes through FlashInfer's tensor-core (prefill-style) kernel,
        which suits GQA groups, rather than its CUDA-core decode kernel.
        split_decode_max_batch: decode batches up to this size run our split-KV kernel
        (0: FlashInfer for every batch).
        hybrid_decode_kernels: in hybrid iterations, decodes run through the decode kernels and
        only the chunks through the prefill kernel (False: one prefill launch for all)."""
        self.device = device
        self.hybrid_decode_kernels = hybrid_decode_kernels
        # Decodes of a hybrid iteration up to this many take the split-KV kernel (None: as
        # decode-only batches do). A knob of its own, since captured decode graphs fix theirs.
        # At 64 decodes (ctx 1024) beside a 512 chunk, on an H200, split-KV measured 0.5-0.75 ms
        # faster in two eager runs and 4 ms slower in a third (eager is host-bound there, so
        # noisy); graphs with FlashInfer's decode are what gpu_bench measured as served.
        self.hybrid_split_max: int | None = None
        # Prefill chunks of at most this many tokens each run through our Triton kernel rather
        # than FlashInfer's prefill (0: never). Off until measured: a 512-token chunk's
        # attention took 0.49 ms per iteration through FlashInfer's Hopper kernel, ~5x its FLOPs
        # (benchmarks/kernels/chunk_attention.py times the candidates).
        self.triton_chunk_max_tokens = 0
        # (query_start, block_tables, context_lens, longest chunk) of this iteration's chunks
        # when they take the Triton kernel, else None.
        self._triton_chunks: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None
        self.decode_tensor_cores = decode_tensor_cores
        self.split_decode_max_batch = split_decode_max_batch
        self._split_decode = False
        self._hybrid_decodes = 0     # leading decode rows of this hybrid iteration
        self._hybrid_split = False   # ...which run our split-KV kernel
        self.workspace = torch.zeros(_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        # FlashInfer's prefill wrapper per kernel backend ("auto": FA3 on Hopper), made on first
        # use; set_prefill_backend picks which one runs the chunks.
        self._prefill_by_backend: dict[str, flashinfer.BatchPrefillWithPagedKVCacheWrapper] = {}
        self.set_prefill_backend("auto")
        self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_tensor_cores=decode_tensor_cores)
        self.graph_decode: dict[int, flashinfer.BatchDecodeWithPagedKVCacheWrapper] = {}
        self._graph_pages: dict[int, list[int]] = {}  # pages per row at each wrapper's last plan
        self.shape: tuple[int, int, int] | None = None
        self.dtype = torch.bfloat16
        self.active = self.prefill
        self._zero_pages = torch.zeros(0, dtype=torch.int32, device=device)

    def set_prefill_backend(self, name: str) -> None:
        """Run prefill chunks through FlashInfer's `name` kernels ("auto", "fa2", "fa3"): for
        measuring them (each variant JIT-compiles on first use); serving keeps "auto"."""
        if name not in self._prefill_by_backend:
            self._prefill_by_backend[name] = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
                self.workspace, "NHD", backend=name)
        self.prefill = self._prefill_by_backend[name]

    def configure(self, num_heads: int, num_kv_heads: int, head_dim: int,
                  dtype: torch.dtype) -> None:
        self.shape = (num_heads, num_kv_heads, head_dim)
        self.dtype = dtype

    def begin_iteration(self, meta: AttentionMetadata) -> None:
        if self.shape is None:
            raise RuntimeError("FlashInferAttention.configure was not called")
        num_heads, num_kv_heads, head_dim = self.shape
        bs = meta.block_size
        ctx = meta.context_lens_host
        # Reads the block table and context lengths on the device: nothing to plan.
        self._split_decode = meta.num_decode_only and len(ctx) <= self.split_decode_max_batch
        self._hybrid_decodes = 0
        self._triton_chunks = None
        if self._split_decode:
            return
        pages = [(n + bs - 1) // bs for n in ctx]
        indptr = [0]
        for p in pages:
            indptr.append(indptr[-1] + p)
        last = [n - (p - 1) * bs for n, p in zip(ctx, pages, strict=True)]
        # Plan reads the index pointers on the host: hand it host tensors, so it never syncs.
        # Pinned: plan copies them to the device, and a pageable copy would wait for the GPU.
        indptr_t = pinned_tensor(indptr, torch.int32)
        last_t = pinned_tensor(last, torch.int32)
        common = dict(q_data_type=self.dtype, kv_data_type=self.dtype)
        if meta.graph_batch_size:
            wrapper = self._graph_wrapper(meta.graph_batch_size, meta.block_tables.shape[1])
            self.active = wrapper
            # FlashInfer's plan (how the KV is split into work items) depends only on the page
            # count per row; page ids and last-page lengths are read from the wrapper's buffers
            # when the kernels run, and graph_prologue refreshes those on the device. So a step
            # whose page counts match the last plan needs no host work here at all.
            if self._graph_pages.get(meta.graph_batch_size) != pages:
                # On the device: FlashInfer copies a host one synchronously, which would stall
                # the host until the GPU drains. graph_prologue fills the real page ids.
                placeholder = self._zeros(indptr[-1])
                wrapper.plan(indptr_t, placeholder, last_t, num_heads, num_kv_heads, head_dim, bs,
                             **common)
                self._graph_pages[meta.graph_batch_size] = pages
            return
        indices = self._page_indices(meta.block_tables, pages, indptr_t, indptr[-1])
        shape = (num_heads, num_kv_heads, head_dim, bs)
        if meta.num_decode_only:
            self.decode.plan(indptr_t, indices, last_t, *shape, **common)
            self.active = self.decode
            return
        # A hybrid batch: its leading one-token rows (the runner puts decodes first) go to the
        # decode kernels, the prefill chunks to the prefill kernel. One prefill launch over
        # both would tile every decode as a query block of its own, mostly empty.
        starts = meta.query_start_host
        d = 0
        while self.hybrid_decode_kernels and d < len(ctx) and starts[d + 1] - starts[d] == 1:
            d += 1
        self._hybrid_decodes = d
        split_max = self.split_decode_max_batch if self.hybrid_split_max is None else self.hybrid_split_max
        if 0 < d <= split_max:
            self._hybrid_split = True
        elif d:
            self._hybrid_split = False
            self.decode.plan(pinned_tensor(indptr[:d + 1], torch.int32), indices[:indptr[d]],
                             pinned_tensor(last[:d], torch.int32), *shape, **common)
        longest = max(b - a for a, b in zip(starts[d:], starts[d + 1:], strict=False))
        if longest <= self.triton_chunk_max_tokens:  # every chunk has a token: 0 is never
            # Rows from d on, offsets from 0: made once here, read by every layer.
            self._triton_chunks = (meta.query_start[d:] - d, meta.block_tables[d:],
                                   meta.context_lens[d:], longest)
            return
        qo_indptr = pinned_tensor([x - d for x in starts[d:]], torch.int32)
        kv_indptr = pinned_tensor([x - indptr[d] for x in indptr[d:]], torch.int32) if d else indptr_t
        self.prefill.plan(qo_indptr, kv_indptr, indices[indptr[d]:], pinned_tensor(last[d:], torch.int32)
                          if d else last_t, *shape, causal=True, **common)
        self.active = self.prefill

    def _zeros(self, n: int) -> torch.Tensor:
        if self._zero_pages.numel() < n:
            self._zero_pages = torch.zeros(max(n, 2 * self._zero_pages.numel()), dtype=torch.int32,
                                           device=self.device)
        return self._zero_pages[:n]

    def graph_prologue(self, meta: AttentionMetadata) -> None:
        """Page ids and last-page lengths from the static context lengths and block table, into
        the graph wrapper's buffers, with fixed-shape ops only (capturable)."""
        if meta.graph_batch_size <= self.split_decode_max_batch:
            return  # the split-KV kernel reads the static buffers themselves
        wrapper = self.graph_decode[meta.graph_batch_size]
        bs = meta.block_size
        ctx = meta.context_lens
        pages = (ctx + bs - 1) // bs
        width = meta.block_tables.shape[1]
        col = torch.arange(width, device=ctx.device, dtype=torch.int32)
        starts = wrapper._paged_kv_indptr_buf[:-1]  # as planned: same page counts
        used = col.unsqueeze(0) < pages.unsqueeze(1)
        spill = wrapper._paged_kv_indices_buf.shape[0] - 1  # unused entries land in the last slot
        dest = torch.where(used, starts.unsqueeze(1) + col, spill).to(torch.int64)
        wrapper._paged_kv_indices_buf.scatter_(0, dest.flatten(), meta.block_tables.flatten())
        wrapper._paged_kv_last_page_len_buf.copy_(ctx - (pages - 1) * bs)

    def _page_indices(self, block_tables: torch.Tensor, pages: list[int], indptr: torch.Tensor,
                      total: int) -> torch.Tensor:
        """The used prefix of every block-table row, concatenated, gathered on the device."""
        dev = self.device
        seq = torch.repeat_interleave(
            torch.arange(len(pages), device=dev),
            upload(pages, torch.int64, dev), output_size=total)
        col = torch.arange(total, device=dev) - upload(indptr, torch.int32, dev)[seq]
        return block_tables[seq, col]

    def _graph_wrapper(self, batch: int, width: int) -> flashinfer.BatchDecodeWithPagedKVCacheWrapper:
        wrapper = self.graph_decode.get(batch)
        if wrapper is None:
            dev = self.device
            wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self.workspace, "NHD", use_cuda_graph=True,
                use_tensor_cores=self.decode_tensor_cores,
                paged_kv_indptr_buffer=torch.zeros(batch + 1, dtype=torch.int32, device=dev),
                # One spare entry at the end: graph_prologue's sink for unused table columns.
                paged_kv_indices_buffer=torch.zeros(batch * width + 1, dtype=torch.int32,
                                                    device=dev),
                paged_kv_last_page_len_buffer=torch.zeros(batch, dtype=torch.int32, device=dev))
            self.graph_decode[batch] = wrapper
        return wrapper

    def write_kv(self, kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 meta: AttentionMetadata) -> None:
        write_kv(kv_cache, k, v, meta.slot_mapping)

    def forward(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
        if q.stride(-2) != q.shape[-1] or q.stride(0) != q.shape[1] * q.shape[2]:
            q = q.contiguous()  # the kernels take q packed
        if self._split_decode:
            return paged_decode(q, kv_cache, meta.block_tables, meta.context_lens, scale, out=out)
        d = self._hybrid_decodes
        if not d and self._triton_chunks is None:
            return self.active.run(q, kv_cache, out=out)
        if out is None:
            out = torch.empty_like(q)
        if d and self._hybrid_split:
            paged_decode(q[:d], kv_cache, meta.block_tables[:d], meta.context_lens[:d], scale,
                         out=out[:d])
        elif d:
            self.decode.run(q[:d], kv_cache, out=out[:d])
        if self._triton_chunks is not None:
            query_start, block_tables, context_lens, longest = self._triton_chunks
            paged_attention(q[d:], kv_cache, block_tables, query_start, context_lens, scale, longest,
                            out=out[d:])
        else:
            self.prefill.run(q[d:], kv_cache, out=out[d:])
        return out

"""A prefill chunk's attention alone, per layer call, for each kernel we could run it with.

In a hybrid iteration of a 512-token chunk beside 64 decodes, the chunk's attention is ~0.07 ms of
FLOPs over 32 layers but took 0.49 ms through FlashInfer's Hopper (FA3) kernel (2026-12-03, H200,
benchmarks/step/gpu_bench_results.md): a third of what keeps that row above 1.2x its floor. This
times the candidates on the same paged cache (blocks of 16, our [blocks, 2, 16, kv_heads, dim]
layout), each variant's calls for all 32 layers captured in one CUDA graph:
- FlashInfer's BatchPrefillWithPagedKVCacheWrapper as the worker makes it (backend "auto": FA3 on
  Hopper), and with backend "fa2";
- our Triton kernel (sarathi_kernels/paged_attention.py);
- vLLM's FlashAttention 3 (`vllm.vllm_flash_attn.flash_attn_varlen_func`, paged through a block
  table), where vLLM is importable (the peer sitting unpacks it into /tmp/vllm: add it to
  PYTHONPATH). flash-attn itself has no wheel for the GPU machine's torch, and it has no network
  to build one, so vLLM's build of its Hopper kernels is the FlashAttention measured here.

Shapes are CHUNK,PRIOR (a chunk of CHUNK query tokens of one prompt whose first PRIOR tokens are
already cached), or several chunks as CHUNKxN,PRIOR, with +D@CTX for D decodes at context CTX
beside them (a hybrid iteration's attention: 512,0+64@1024 is the first acceptance row's). The
table gives microseconds per layer call and, for chunks alone, the causal attention FLOPs rate that
implies (with decodes: how far above the time to read their KV at --copy-tbs), and each variant's
largest difference from the torch reference (worker_service/attention/torch_ref.py) on the first
layer's call.

  python -m benchmarks.kernels.chunk_attention [--shapes 512,0 512,1536 2048,0 2048,2048 512x4,0
      512,0+64@1024] [--heads 32 --kv-heads 8]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from benchmarks.kernels.graph_timing import microseconds_per_call
from worker_service.attention import AttentionMetadata
from worker_service.attention.backend import AttentionBackend
from worker_service.attention.torch_ref import TorchAttention
from worker_service.attention.triton_backend import TritonAttention

DEV = torch.device("cuda")
DIM, BLOCK, LAYERS = 128, 16, 32


@dataclass(frozen=True)
class ChunkShape:
    chunk: int    # query tokens per chunk
    count: int    # chunks (each of its own prompt)
    prior: int    # tokens of each prompt already cached before its chunk
    decodes: int = 0      # one-token rows beside the chunks (ordered first, as the runner does)
    decode_ctx: int = 0   # each decode's context

    @property
    def label(self) -> str:
        chunks = f"{self.chunk}" if self.count == 1 else f"{self.count} x {self.chunk}"
        beside = f" + {self.decodes} decodes at {self.decode_ctx}" if self.decodes else ""
        return f"{chunks} after {self.prior}{beside}"

    @property
    def rows(self) -> list[tuple[int, int]]:
        """(query tokens, context) per row: the decodes, then the chunks."""
        return ([(1, self.decode_ctx)] * self.decodes
                + [(self.chunk, self.prior + self.chunk)] * self.count)

    def decode_kv_bytes(self, kv_heads: int) -> int:
        return self.decodes * self.decode_ctx * 2 * kv_heads * DIM * 2   # K and V, bf16

    def flops(self, heads: int) -> float:
        """Causal attention FLOPs (QK^T and PV) of every chunk's queries."""
        keys = self.chunk * self.prior + self.chunk * (self.chunk + 1) / 2
        return 4 * heads * DIM * keys * self.count


def chunk_shape(text: str) -> ChunkShape:
    """CHUNK,PRIOR or CHUNKxN,PRIOR, optionally +D@CTX -> a ChunkShape."""
    try:
        chunks_text, _, beside = text.partition("+")
        chunks, prior = chunks_text.split(",")
        chunk, _, count = chunks.partition("x")
        decodes, ctx = beside.split("@") if beside else ("0", "0")
        shape = ChunkShape(int(chunk), int(count or 1), int(prior), int(decodes), int(ctx))
    except ValueError:
        shape = None
    if shape is None or min(shape.chunk, shape.count) < 1 or (shape.decodes and shape.decode_ctx < 1):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give CHUNK,PRIOR or CHUNKxN,PRIOR, optionally +DECODES@CONTEXT, "
            f"e.g. 512,1536 or 512,512+64@1024")
    return shape


def metadata(shape: ChunkShape) -> AttentionMetadata:
    """Each row's sequence in blocks of its own; a chunk the last `chunk` positions of its
    prompt."""
    rows = shape.rows
    pages = [-(-ctx // BLOCK) for _, ctx in rows]
    width = max(pages)
    firsts = [sum(pages[:i]) for i in range(len(rows))]
    tables = torch.tensor([[f + j if j < p else 0 for j in range(width)]
                           for f, p in zip(firsts, pages, strict=True)], dtype=torch.int32, device=DEV)
    starts = [0]
    for q, _ in rows:
        starts.append(starts[-1] + q)
    ctx = [c for _, c in rows]
    return AttentionMetadata(
        query_start=torch.tensor(starts, dtype=torch.int32, device=DEV),
        context_lens=torch.tensor(ctx, dtype=torch.int32, device=DEV),
        block_tables=tables, slot_mapping=torch.full((starts[-1],), -1, dtype=torch.int64, device=DEV),
        block_size=BLOCK, query_start_host=starts, context_lens_host=ctx)


def backend_calls(backend: AttentionBackend, q: torch.Tensor, caches: list[torch.Tensor],
                  meta: AttentionMetadata, heads: int, kv_heads: int) -> list[Callable[[], object]]:
    backend.configure(heads, kv_heads, DIM, torch.bfloat16)
    backend.begin_iteration(meta)
    out = torch.empty_like(q)
    return [lambda c=c: backend.forward(q, c, meta, DIM ** -0.5, out=out) for c in caches]


def vllm_fa3_calls(q: torch.Tensor, caches: list[torch.Tensor], meta: AttentionMetadata,
                   shape: ChunkShape) -> list[Callable[[], object]]:
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    out = torch.empty_like(q)
    longest_ctx = max(meta.context_lens_host)
    # K and V as [blocks, 16, kv_heads, dim] views of our cache (strided over its K/V axis).
    return [lambda c=c: flash_attn_varlen_func(
        q, c[:, 0], c[:, 1], max_seqlen_q=shape.chunk, cu_seqlens_q=meta.query_start,
        max_seqlen_k=longest_ctx, seqused_k=meta.context_lens, softmax_scale=DIM ** -0.5,
        causal=True, block_table=meta.block_tables, out=out, fa_version=3) for c in caches]


def variants() -> Iterator[tuple[str, str, Callable]]:
    """(key, name, make calls for (q, caches, meta, shape, heads, kv_heads))."""
    def flashinfer(prefill_backend: str) -> Callable:
        def make(q, caches, meta, shape, heads, kv_heads):
            from worker_service.attention.flashinfer_backend import FlashInferAttention

            attention = FlashInferAttention(DEV, split_decode_max_batch=0)
            attention.set_prefill_backend(prefill_backend)
            return backend_calls(attention, q, caches, meta, heads, kv_heads)
        return make

    yield ("flashinfer", "flashinfer as the worker (chunks: auto, FA3 on Hopper; decodes: its decode "
           "kernel)", flashinfer("auto"))
    yield "flashinfer-fa2", "flashinfer, chunks through fa2", flashinfer("fa2")
    yield "triton", "triton (ours)", lambda q, caches, meta, shape, heads, kv_heads: backend_calls(
        TritonAttention(), q, caches, meta, heads, kv_heads)
    yield "vllm-fa3", "vLLM FlashAttention 3", lambda q, caches, meta, shape, heads, kv_heads: \
        vllm_fa3_calls(q, caches, meta, shape)


VARIANT_KEYS = tuple(key for key, _, _ in variants())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", type=chunk_shape, nargs="+",
                    default=[chunk_shape(s) for s in ("512,0", "512,1536", "2048,0", "2048,2048", "512x4,0",
                                                      "512,0+64@1024", "2048,0+128@4096")])
    ap.add_argument("--variants", nargs="+", choices=VARIANT_KEYS, default=list(VARIANT_KEYS),
                    help="which kernels (flashinfer-fa2 JIT-compiles for ~1.5 min on first use)")
    ap.add_argument("--copy-tbs", type=float, default=4.24,
                    help="the copy bandwidth (TB/s) the decodes' KV time is set against (4.24: H200)")
    ap.add_argument("--heads", type=int, default=32, help="query heads (32: Llama-3-8B)")
    ap.add_argument("--kv-heads", type=int, default=8, help="KV heads (8: Llama-3-8B)")
    args = ap.parse_args()
    print(f"Prefill chunk attention per layer call, {args.heads} query / {args.kv_heads} KV heads, "
          f"head dim {DIM}, blocks of {BLOCK}, {torch.cuda.get_device_name()}\n")
    print("| variant | " + " | ".join(s.label for s in args.shapes) + " |")
    print("| --- |" + " --- |" * len(args.shapes))
    for key, name, make in variants():
        if key not in args.variants:
            continue
        cells = []
        for shape in args.shapes:
            meta = metadata(shape)
            blocks = meta.block_tables.numel()
            caches = [torch.randn(blocks, 2, BLOCK, args.kv_heads, DIM, device=DEV, dtype=torch.bfloat16)
                      for _ in range(LAYERS)]
            q = torch.randn(meta.query_start_host[-1], args.heads, DIM, device=DEV, dtype=torch.bfloat16)
            try:
                calls = make(q, caches, meta, shape, args.heads, args.kv_heads)
                # A fast variant that reads the cache wrongly must not pass for a fast one.
                got = calls[0]().float()
                want = TorchAttention().forward(q, caches[0], meta, DIM ** -0.5).float()
                err = (got - want).abs().max().item()
                us = microseconds_per_call(calls)
                kv_us = shape.decode_kv_bytes(args.kv_heads) / (args.copy_tbs * 1e6)
                rate = (f"{us / kv_us:.2f}x the decodes' KV read" if shape.decodes
                        else f"{shape.flops(args.heads) / us / 1e6:.0f} TFLOP/s")
                cells.append(f"{us:.1f} us ({rate}, max err {err:.1e})")
            except Exception as e:  # noqa: BLE001 - a variant that cannot run is reported, not fatal
                cells.append(f"failed: {type(e).__name__}: {str(e)[:60]}")
            del caches
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

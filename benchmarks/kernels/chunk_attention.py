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
already cached), or several chunks as CHUNKxN,PRIOR. The table gives microseconds per layer call
and the causal attention FLOPs rate that implies, and each variant's largest difference from the
torch reference (worker_service/attention/torch_ref.py) on the first layer's call.

  python -m benchmarks.kernels.chunk_attention [--shapes 512,0 512,1536 2048,0 2048,2048 512x4,0]
      [--heads 32 --kv-heads 8]
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

    @property
    def label(self) -> str:
        chunks = f"{self.chunk}" if self.count == 1 else f"{self.count} x {self.chunk}"
        return f"{chunks} after {self.prior}"

    def flops(self, heads: int) -> float:
        """Causal attention FLOPs (QK^T and PV) of every chunk's queries."""
        keys = self.chunk * self.prior + self.chunk * (self.chunk + 1) / 2
        return 4 * heads * DIM * keys * self.count


def chunk_shape(text: str) -> ChunkShape:
    """CHUNK,PRIOR or CHUNKxN,PRIOR -> a ChunkShape."""
    try:
        chunks, prior = text.split(",")
        chunk, _, count = chunks.partition("x")
        return ChunkShape(int(chunk), int(count or 1), int(prior))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give CHUNK,PRIOR or CHUNKxN,PRIOR, e.g. 512,1536") from None


def metadata(shape: ChunkShape) -> AttentionMetadata:
    """Each chunk's prompt in blocks of its own, its chunk the last `chunk` positions."""
    total = shape.prior + shape.chunk
    pages = -(-total // BLOCK)
    n = shape.count
    tables = torch.arange(n * pages, dtype=torch.int32, device=DEV).view(n, pages)
    starts = [i * shape.chunk for i in range(n + 1)]
    return AttentionMetadata(
        query_start=torch.tensor(starts, dtype=torch.int32, device=DEV),
        context_lens=torch.full((n,), total, dtype=torch.int32, device=DEV),
        block_tables=tables, slot_mapping=torch.full((n * shape.chunk,), -1, dtype=torch.int64, device=DEV),
        block_size=BLOCK, query_start_host=starts, context_lens_host=[total] * n)


def backend_calls(backend: AttentionBackend, q: torch.Tensor, caches: list[torch.Tensor],
                  meta: AttentionMetadata, heads: int, kv_heads: int) -> list[Callable[[], object]]:
    backend.configure(heads, kv_heads, DIM, torch.bfloat16)
    backend.begin_iteration(meta)
    out = torch.empty_like(q)
    return [lambda c=c: backend.forward(q, c, meta, DIM ** -0.5, out=out) for c in caches]


def vllm_fa3_calls(q: torch.Tensor, caches: list[torch.Tensor], meta: AttentionMetadata,
                   shape: ChunkShape) -> list[Callable[[], object]]:
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    total = shape.prior + shape.chunk
    seqused = torch.full((shape.count,), total, dtype=torch.int32, device=DEV)
    out = torch.empty_like(q)
    # K and V as [blocks, 16, kv_heads, dim] views of our cache (strided over its K/V axis).
    return [lambda c=c: flash_attn_varlen_func(
        q, c[:, 0], c[:, 1], max_seqlen_q=shape.chunk, cu_seqlens_q=meta.query_start,
        max_seqlen_k=total, seqused_k=seqused, softmax_scale=DIM ** -0.5, causal=True,
        block_table=meta.block_tables, out=out, fa_version=3) for c in caches]


def variants() -> Iterator[tuple[str, str, Callable]]:
    """(key, name, make calls for (q, caches, meta, shape, heads, kv_heads))."""
    def flashinfer(prefill_backend: str) -> Callable:
        def make(q, caches, meta, shape, heads, kv_heads):
            from worker_service.attention.flashinfer_backend import FlashInferAttention

            attention = FlashInferAttention(DEV, split_decode_max_batch=0)
            attention.set_prefill_backend(prefill_backend)
            return backend_calls(attention, q, caches, meta, heads, kv_heads)
        return make

    yield "flashinfer", "flashinfer (as the worker: auto, FA3 on Hopper)", flashinfer("auto")
    yield "flashinfer-fa2", "flashinfer, fa2", flashinfer("fa2")
    yield "triton", "triton (ours)", lambda q, caches, meta, shape, heads, kv_heads: backend_calls(
        TritonAttention(), q, caches, meta, heads, kv_heads)
    yield "vllm-fa3", "vLLM FlashAttention 3", lambda q, caches, meta, shape, heads, kv_heads: \
        vllm_fa3_calls(q, caches, meta, shape)


VARIANT_KEYS = tuple(key for key, _, _ in variants())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", type=chunk_shape, nargs="+",
                    default=[chunk_shape(s) for s in ("512,0", "512,1536", "2048,0", "2048,2048", "512x4,0")])
    ap.add_argument("--variants", nargs="+", choices=VARIANT_KEYS, default=list(VARIANT_KEYS),
                    help="which kernels (flashinfer-fa2 JIT-compiles for ~1.5 min on first use)")
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
            q = torch.randn(shape.chunk * shape.count, args.heads, DIM, device=DEV, dtype=torch.bfloat16)
            try:
                calls = make(q, caches, meta, shape, args.heads, args.kv_heads)
                # A fast variant that reads the cache wrongly must not pass for a fast one.
                got = calls[0]().float()
                want = TorchAttention().forward(q, caches[0], meta, DIM ** -0.5).float()
                err = (got - want).abs().max().item()
                us = microseconds_per_call(calls)
                cells.append(f"{us:.1f} us ({shape.flops(args.heads) / us / 1e6:.0f} TFLOP/s, "
                             f"max err {err:.1e})")
            except Exception as e:  # noqa: BLE001 - a variant that cannot run is reported, not fatal
                cells.append(f"failed: {type(e).__name__}: {str(e)[:60]}")
            del caches
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

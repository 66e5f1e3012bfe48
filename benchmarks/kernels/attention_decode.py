"""Decode attention alone, per layer call, for each GPU backend variant: which to use when.

Llama-3-8B's attention shape by default (32 query heads, 8 KV heads, head dim 128; a TP rank's
share with --heads/--kv-heads, e.g. 16/2 for a 70B model at TP=4), bf16, paged KV in blocks of
16, every sequence at the same context. Each variant's calls for all 32 layers are
captured in one CUDA graph (as the decode graphs run them), and the replay is timed; the table
gives microseconds per layer call and the KV bandwidth that implies.

  python -m benchmarks.kernels.attention_decode [--batches 1 8 32 64 128] [--context 1024]
      [--heads 32 --kv-heads 8]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.kernels.graph_timing import microseconds_per_call
from sarathi_kernels.paged_decode import paged_decode
from worker_service.attention import AttentionMetadata
from worker_service.attention.flashinfer_backend import FlashInferAttention
from worker_service.attention.triton_backend import TritonAttention

DEV = torch.device("cuda")
DIM, BLOCK, LAYERS = 128, 16, 32


class FixedSplits(TritonAttention):
    """Our split-KV decode kernel with a given number of ranges per (sequence, KV head)."""

    def __init__(self, splits: int) -> None:
        super().__init__()
        self.splits = splits

    def forward(self, q, kv_cache, meta, scale, out=None):
        return paged_decode(q, kv_cache, meta.block_tables, meta.context_lens, scale, splits=self.splits,
                            out=out)


def variants(sweep: list[int]):
    yield "flashinfer, tensor cores", FlashInferAttention(DEV, decode_tensor_cores=True,
                                                          split_decode_max_batch=0)
    yield "flashinfer, CUDA cores", FlashInferAttention(DEV, decode_tensor_cores=False,
                                                        split_decode_max_batch=0)
    yield "triton split-KV (ours, splits by batch)", TritonAttention()
    for n in sweep:
        yield f"triton split-KV, {n} splits", FixedSplits(n)


def time_variant(backend, batch: int, context: int, heads: int, kv_heads: int) -> float:
    """Microseconds per layer call, from one graph replay of LAYERS calls."""
    pages = -(-context // BLOCK)
    caches = [torch.randn(batch * pages, 2, BLOCK, kv_heads, DIM, device=DEV, dtype=torch.bfloat16)
              for _ in range(LAYERS)]
    tables = torch.arange(batch * pages, dtype=torch.int32, device=DEV).view(batch, pages)
    meta = AttentionMetadata(
        query_start=torch.arange(batch + 1, dtype=torch.int32, device=DEV),
        context_lens=torch.full((batch,), context, dtype=torch.int32, device=DEV),
        block_tables=tables, slot_mapping=torch.full((batch,), -1, dtype=torch.int64, device=DEV),
        block_size=BLOCK, query_start_host=list(range(batch + 1)), context_lens_host=[context] * batch,
        num_decode_only=True)
    backend.configure(heads, kv_heads, DIM, torch.bfloat16)
    backend.begin_iteration(meta)
    q = torch.randn(batch, heads, DIM, device=DEV, dtype=torch.bfloat16)

    return microseconds_per_call([lambda c=cache: backend.forward(q, c, meta, DIM ** -0.5)
                                  for cache in caches])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64, 128])
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=32, help="query heads (32: Llama-3-8B; a TP rank's share)")
    ap.add_argument("--kv-heads", type=int, default=8, help="KV heads (8: Llama-3-8B; 2: a 70B rank at TP=4)")
    ap.add_argument("--splits", type=int, nargs="*", default=[1, 4, 8, 16, 32],
                    help="fixed split counts to time beside the default choice")
    args = ap.parse_args()
    print(f"Decode attention per layer call, {args.heads} query / {args.kv_heads} KV heads, context "
          f"{args.context}, {torch.cuda.get_device_name()}\n")
    print("| variant | " + " | ".join(f"batch {b}" for b in args.batches) + " |")
    print("| --- |" + " --- |" * len(args.batches))
    for name, backend in variants(args.splits):
        cells = []
        for b in args.batches:
            try:
                us = time_variant(backend, b, args.context, args.heads, args.kv_heads)
                kv = b * args.context * 2 * args.kv_heads * DIM * 2
                cells.append(f"{us:.1f} us ({kv / us / 1e6:.2f} TB/s)")
            except Exception as e:  # noqa: BLE001 - a variant that cannot run is reported, not fatal
                cells.append(f"failed: {type(e).__name__}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

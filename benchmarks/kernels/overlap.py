"""Can decode attention run beside the GEMMs? The question under nano-batch overlap (NanoFlow).

Every iteration we run is a sum: its GEMMs at the tensor cores' rate, then its decodes' attention
at the copy bandwidth. In the offline run's hybrid step (512-token chunk + 256 decodes at ~640,
Llama-3-8B, H200) those were 14.4 ms and 5.95 ms of 24.0 (benchmarks/step/gpu_bench_results.md),
so a step that ran one beside the other would take ~18: the lever left that is worth 1.1x and
more (issue 22, items 2 and 3). Splitting the batch in two and running
half A's attention beside half B's GEMMs gets there only if the GPU does run a memory-bound
attention kernel beside a GEMM that wants every SM. This measures that, per Llama-3-8B layer:
- the layer's four GEMMs (QKV, O, gate-up, down) over M tokens, alone;
- FlashInfer's decode attention (tensor-core kernel, as the worker runs it) over B sequences at
  context C, alone;
- both, one after the other, then side by side on two streams (forked and joined per layer),
  with cuBLAS told to leave 0 or more SMs free (`torch._C._set_sm_carveout_experimental`), the
  attention's stream at normal and at high priority (a GEMM's tiles use most of an SM's shared
  memory, so attention gets an SM only when a tile ends: priority decides who gets it);
each shape's 32 layers captured in one CUDA graph (eager timing where capture fails). If side by
side comes near the larger of the two, overlap is worth building into the runner; near the sum,
it is not.

  python -m benchmarks.kernels.overlap [--shapes 384,128@640 128,128@640 512,64@1024]
      [--carveouts 0 16 32]

Shapes are M,B@C: M tokens through the GEMMs, B decodes at context C through attention. The
defaults: half of the offline run's hybrid step (512-token chunk + 256 decodes at ~640), half of
its decode-only step (256 decodes), and the first acceptance row's chunk beside its 64 decodes.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import torch

from benchmarks.kernels.graph_timing import graph_or_eager_ms
from worker_service.attention import AttentionMetadata

DEV = torch.device("cuda")
HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, DIM = 4096, 14336, 32, 8, 128   # Llama-3-8B
BLOCK, LAYERS, CACHES = 16, 32, 4   # CACHES distinct KV buffers in turn, each beyond L2


@dataclass(frozen=True)
class OverlapShape:
    tokens: int     # M: rows through the GEMMs
    decodes: int    # B: sequences through decode attention
    context: int    # C: each decode's context

    @property
    def label(self) -> str:
        return f"GEMMs of {self.tokens} tokens beside {self.decodes} decodes at {self.context}"


def overlap_shape(text: str) -> OverlapShape:
    """M,B@C -> an OverlapShape."""
    try:
        tokens, rest = text.split(",")
        decodes, context = rest.split("@")
        shape = OverlapShape(int(tokens), int(decodes), int(context))
    except ValueError:
        shape = None
    if shape is None or min(shape.tokens, shape.decodes, shape.context) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give TOKENS,DECODES@CONTEXT, e.g. 256,256@640")
    return shape


def gemm_calls(tokens: int) -> Callable[[], object]:
    """One layer's four GEMMs over `tokens` rows (weights of the real shapes, inputs random)."""
    def w(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, device=DEV, dtype=torch.bfloat16) * 0.02

    qkv, o = w(HIDDEN, (HEADS + 2 * KV_HEADS) * DIM), w(HEADS * DIM, HIDDEN)
    gate_up, down = w(HIDDEN, 2 * INTERMEDIATE), w(INTERMEDIATE, HIDDEN)
    x = torch.randn(tokens, HIDDEN, device=DEV, dtype=torch.bfloat16)
    attn = torch.randn(tokens, HEADS * DIM, device=DEV, dtype=torch.bfloat16)
    act = torch.randn(tokens, INTERMEDIATE, device=DEV, dtype=torch.bfloat16)
    outs = [torch.empty(tokens, n, device=DEV, dtype=torch.bfloat16)
            for n in (qkv.shape[1], HIDDEN, gate_up.shape[1], HIDDEN)]

    def layer() -> None:
        torch.mm(x, qkv, out=outs[0])
        torch.mm(attn, o, out=outs[1])
        torch.mm(x, gate_up, out=outs[2])
        torch.mm(act, down, out=outs[3])
    return layer


def attention_calls(decodes: int, context: int) -> list[Callable[[], object]]:
    """Decode attention per layer as the worker runs it (FlashInfer, planned once), each layer
    on one of CACHES paged caches in turn."""
    from worker_service.attention.flashinfer_backend import FlashInferAttention

    pages = -(-context // BLOCK)
    tables = torch.arange(decodes * pages, dtype=torch.int32, device=DEV).view(decodes, pages)
    meta = AttentionMetadata(
        query_start=torch.arange(decodes + 1, dtype=torch.int32, device=DEV),
        context_lens=torch.full((decodes,), context, dtype=torch.int32, device=DEV),
        block_tables=tables, slot_mapping=torch.full((decodes,), -1, dtype=torch.int64, device=DEV),
        block_size=BLOCK, query_start_host=list(range(decodes + 1)),
        context_lens_host=[context] * decodes, num_decode_only=True)
    backend = FlashInferAttention(DEV, split_decode_max_batch=0)
    backend.configure(HEADS, KV_HEADS, DIM, torch.bfloat16)
    backend.begin_iteration(meta)
    caches = [torch.randn(decodes * pages, 2, BLOCK, KV_HEADS, DIM, device=DEV, dtype=torch.bfloat16)
              for _ in range(CACHES)]
    q = torch.randn(decodes, HEADS, DIM, device=DEV, dtype=torch.bfloat16)
    out = torch.empty_like(q)
    return [lambda c=c: backend.forward(q, c, meta, DIM ** -0.5, out=out) for c in caches]


def microseconds(run_layers: Callable[[], None]) -> tuple[float, str]:
    """Median device time per layer of `run_layers` (all LAYERS layers). -> (us, how timed)."""
    ms, how = graph_or_eager_ms(run_layers)
    return ms * 1e3 / LAYERS, how


def timings(shape: OverlapShape, carveouts: list[int]) -> list[tuple[str, float, str]]:
    """(what, us per layer, how timed) for one shape."""
    gemms = gemm_calls(shape.tokens)
    attention = attention_calls(shape.decodes, shape.context)
    normal, urgent = torch.cuda.Stream(), torch.cuda.Stream(priority=-1)

    def alone_gemms() -> None:
        for _ in range(LAYERS):
            gemms()

    def alone_attention() -> None:
        for i in range(LAYERS):
            attention[i % CACHES]()

    def in_turn() -> None:
        for i in range(LAYERS):
            attention[i % CACHES]()
            gemms()

    def side_by_side(side: torch.cuda.Stream) -> Callable[[], None]:
        def run() -> None:
            main = torch.cuda.current_stream()
            for i in range(LAYERS):
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    attention[i % CACHES]()
                gemms()
                main.wait_stream(side)
        return run

    rows = [("GEMMs alone", *microseconds(alone_gemms)),
            ("attention alone", *microseconds(alone_attention)),
            ("one after the other", *microseconds(in_turn))]
    for n in carveouts:
        torch._C._set_sm_carveout_experimental(n or None)
        try:
            if n:
                rows.append((f"GEMMs alone, {n} SMs left free", *microseconds(alone_gemms)))
            for side, name in ((normal, ""), (urgent, ", attention at high priority")):
                rows.append((f"side by side, {n} SMs left free by cuBLAS{name}",
                             *microseconds(side_by_side(side))))
        finally:
            torch._C._set_sm_carveout_experimental(None)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", type=overlap_shape, nargs="+",
                    default=[overlap_shape(s) for s in ("384,128@640", "128,128@640", "512,64@1024")])
    ap.add_argument("--carveouts", type=int, nargs="+", default=[0, 16, 32],
                    help="SMs cuBLAS leaves free for the attention beside it (0: none)")
    args = ap.parse_args()
    print(f"Decode attention beside the GEMMs, per Llama-3-8B layer, {torch.cuda.get_device_name()} "
          f"({torch.cuda.get_device_properties(DEV).multi_processor_count} SMs)\n")
    for shape in args.shapes:
        rows = timings(shape, args.carveouts)
        gemm, attn = rows[0][1], rows[1][1]
        best = max(gemm, attn)
        print(f"### {shape.label}\n\n| run | us per layer | against max(GEMMs, attention) | timed as |\n"
              f"| --- | --- | --- | --- |")
        for what, us, how in rows:
            print(f"| {what} | {us:.1f} | {us / best:.2f}x | {how} |")
        together = min(us for what, us, _ in rows if what.startswith("side by side"))
        saved = gemm + attn - together
        print(f"\nbest side by side saves {saved:.1f} us of {attn:.1f} us of attention per layer "
              f"({saved / attn * 100:.0f}%)\n", flush=True)


if __name__ == "__main__":
    main()

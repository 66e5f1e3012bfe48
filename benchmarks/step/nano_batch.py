"""One iteration as two nano-batches on two streams (NanoFlow's overlap), on the model's own layers.

Every iteration the worker runs is a sum of its GEMMs (at the tensor cores' rate) and its
decodes' attention (at the copy bandwidth), one after the other. Split the batch in two, give
each half its own stream, and one half's memory-bound attention can run while the other half's
GEMMs hold the tensor cores: an iteration could then take less than that sum (issue 22: the
lever left for offline throughput and capacity). The split costs something too: each half reads
the weights, and each GEMM is smaller. This measures both, before the runner learns to do it:
the model's real layers (norms, fused rotary + KV store, FlashInfer attention planned once per
nano-batch, MLP), all of an iteration's layers captured in one CUDA graph per variant:
- one batch, as the worker runs it;
- two nano-batches in turn on one stream (what the split costs);
- two nano-batches on two streams, the decode-heavy one's stream at normal or high priority,
  with cuBLAS leaving 0 or more SMs free (`--carveouts`).
The hidden states of every variant are checked against the one batch's (a split that computes
something else must not pass for a fast one).

  python -m benchmarks.step.nano_batch [--shapes 512+256@640 0+256@640 512+64@1024] [--carveouts 0 16]

Shapes CHUNK+DECODES@CONTEXT: one prompt's first CHUNK tokens beside DECODES decodes at CONTEXT.
Splits: with a chunk, the chunk in one nano-batch and the decodes in the other ("by kind"), and
the chunk with half the decodes beside the other half; without, the decodes in halves.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import torch

from benchmarks.step.driver import measure_copy_bandwidth, measure_matmul_flops
from benchmarks.step.floors import hybrid_floor
from sarathi_common.model_spec import resolve
from worker_service.attention import AttentionMetadata
from worker_service.models.loader import load_model

DEV = torch.device("cuda")
BLOCK = 16


@dataclass(frozen=True)
class IterationShape:
    chunk: int      # tokens of one prompt's first chunk (0: a decode-only iteration)
    decodes: int
    context: int    # each decode's context

    @property
    def label(self) -> str:
        chunk = f"{self.chunk}-token chunk + " if self.chunk else ""
        return f"{chunk}{self.decodes} decodes at {self.context}"

    @property
    def rows(self) -> list[tuple[int, int]]:
        """(query tokens, context after this step) per sequence: decodes first, as the runner."""
        return [(1, self.context)] * self.decodes + ([(self.chunk, self.chunk)] if self.chunk else [])

    def splits(self) -> list[tuple[str, list[int], list[int]]]:
        """(name, rows of nano-batch A, rows of B); B holds decodes only."""
        d = self.decodes
        half = list(range(d // 2)), list(range(d // 2, d))
        if not self.chunk:
            return [("decodes in halves", *half)]
        return [("chunk | decodes", [d], list(range(d))),
                ("chunk + half the decodes | the other half", half[0] + [d], half[1])]


def iteration_shape(text: str) -> IterationShape:
    """CHUNK+DECODES@CONTEXT -> an IterationShape."""
    try:
        chunk, rest = text.split("+")
        decodes, context = rest.split("@")
        shape = IterationShape(int(chunk), int(decodes), int(context))
    except ValueError:
        shape = None
    if shape is None or shape.chunk < 0 or shape.decodes < 2 or shape.context < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give CHUNK+DECODES@CONTEXT with at least 2 decodes, e.g. 512+256@640")
    return shape


def block_tables(rows: list[tuple[int, int]]) -> list[list[int]]:
    """Each sequence's blocks, in row order: every variant reads and writes the same slots."""
    tables, first = [], 0
    for _, ctx in rows:
        pages = -(-ctx // BLOCK)
        tables.append(list(range(first, first + pages)))
        first += pages
    return tables


class NanoBatch:
    """Some rows of the iteration: their inputs, attention metadata and a FlashInfer backend of
    their own, planned once."""

    def __init__(self, model, rows: list[tuple[int, int]], tables: list[list[int]],
                 hidden: torch.Tensor, positions: torch.Tensor) -> None:
        from worker_service.attention.flashinfer_backend import FlashInferAttention

        config = model.config
        starts, slots = [0], []
        for (q, ctx), table in zip(rows, tables, strict=True):
            slots += (table[p // BLOCK] * BLOCK + p % BLOCK for p in range(ctx - q, ctx))
            starts.append(starts[-1] + q)
        width = max(len(t) for t in tables)
        ctx = [c for _, c in rows]
        self.meta = AttentionMetadata(
            query_start=torch.tensor(starts, dtype=torch.int32, device=DEV),
            context_lens=torch.tensor(ctx, dtype=torch.int32, device=DEV),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32,
                                      device=DEV),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEV), block_size=BLOCK,
            query_start_host=starts, context_lens_host=ctx, num_decode_only=starts[-1] == len(rows))
        self.hidden, self.positions = hidden, positions
        self.backend = FlashInferAttention(DEV, split_decode_max_batch=0)
        self.backend.configure(config.num_heads, config.num_kv_heads, config.head_dim, torch.bfloat16)
        self.backend.begin_iteration(self.meta)
        self.x: torch.Tensor | None = None
        self.residual: torch.Tensor | None = None

    def start(self) -> None:
        self.x, self.residual = self.hidden, None

    def layer(self, model, i: int, cache: torch.Tensor) -> None:
        layer = model.layers[i]
        q, self.residual = layer.begin(self.x, self.residual, self.positions, model.rotary, cache, self.meta)
        attn = self.backend.forward(q, cache, self.meta, layer.attn.scale)
        self.x, self.residual = layer.end(attn, self.residual)

    def output(self) -> torch.Tensor:
        return self.x + self.residual


def device_ms(run: Callable[[], None]) -> tuple[float, str]:
    """Median device time of `run` replayed as one CUDA graph (eager where capture fails)."""
    import triton.testing

    run()
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        fn, how = graph.replay, "graph"
    except RuntimeError:
        torch.cuda.synchronize()
        fn, how = run, "eager"
    return triton.testing.do_bench(fn, warmup=5, rep=300, return_mode="median"), how


def measure(model, caches: list[torch.Tensor], shape: IterationShape, carveouts: list[int]
            ) -> list[tuple[str, float, str, float]]:
    """(variant, ms, how timed, largest relative difference from the one batch) per variant."""
    rows = shape.rows
    config = model.config
    tokens = sum(q for q, _ in rows)
    gen = torch.Generator(device=DEV).manual_seed(0)
    ids = torch.randint(1, config.vocab_size, (tokens,), device=DEV, generator=gen)
    positions = torch.cat([torch.arange(ctx - q, ctx, device=DEV) for q, ctx in rows])
    hidden = model.embed_tokens(ids)
    starts = [0]
    for q, _ in rows:
        starts.append(starts[-1] + q)
    tables = block_tables(rows)

    def token_rows(indices: list[int]) -> torch.Tensor:
        return torch.cat([torch.arange(starts[i], starts[i + 1], device=DEV) for i in indices])

    def part(indices: list[int]) -> NanoBatch:
        picked = token_rows(indices)
        return NanoBatch(model, [rows[i] for i in indices], [tables[i] for i in indices],
                         hidden[picked], positions[picked])

    whole = part(list(range(len(rows))))

    def in_turn(*batches: NanoBatch) -> Callable[[], None]:
        def run() -> None:
            for b in batches:
                b.start()
            for i, cache in enumerate(caches):
                for b in batches:
                    b.layer(model, i, cache)
        return run

    def side_by_side(a: NanoBatch, b: NanoBatch, stream_b: torch.cuda.Stream) -> Callable[[], None]:
        stream_a = torch.cuda.Stream()

        def run() -> None:
            main = torch.cuda.current_stream()
            a.start()
            b.start()
            for stream in (stream_a, stream_b):
                stream.wait_stream(main)
            for i, cache in enumerate(caches):   # issued in turn; each stream runs at its pace
                for stream, batch in ((stream_a, a), (stream_b, b)):
                    with torch.cuda.stream(stream):
                        batch.layer(model, i, cache)
            for stream in (stream_a, stream_b):
                main.wait_stream(stream)
        return run

    ms, how = device_ms(in_turn(whole))
    want = whole.output().float()
    out = [("one batch (as the worker)", ms, how, 0.0)]

    def check(order: list[int], *batches: NanoBatch) -> float:
        got = torch.cat([b.output() for b in batches]).float()
        ref = want[token_rows(order)]
        return ((got - ref).norm() / ref.norm()).item()

    for name, rows_a, rows_b in shape.splits():
        a, b = part(rows_a), part(rows_b)
        ms, how = device_ms(in_turn(a, b))
        out.append((f"{name}: in turn", ms, how, check(rows_a + rows_b, a, b)))
        for n in carveouts:
            torch._C._set_sm_carveout_experimental(n or None)
            try:
                for priority, label in ((0, ""), (-1, ", decodes' stream at high priority")):
                    ms, how = device_ms(side_by_side(a, b, torch.cuda.Stream(priority=priority)))
                    free = f", cuBLAS leaving {n} SMs" if n else ""
                    out.append((f"{name}: two streams{free}{label}", ms, how,
                                check(rows_a + rows_b, a, b)))
            finally:
                torch._C._set_sm_carveout_experimental(None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--shapes", type=iteration_shape, nargs="+",
                    default=[iteration_shape(s) for s in ("512+256@640", "0+256@640", "512+64@1024")])
    ap.add_argument("--carveouts", type=int, nargs="+", default=[0, 16],
                    help="SMs cuBLAS leaves free on the two-stream runs (0: none)")
    args = ap.parse_args()
    from worker_service.attention.flashinfer_backend import FlashInferAttention

    bw, mm = measure_copy_bandwidth(), measure_matmul_flops()
    model = load_model(resolve(f"dummy:{args.model}"), FlashInferAttention(DEV), DEV, torch.bfloat16)
    config = model.config
    blocks = max(sum(map(len, block_tables(s.rows))) for s in args.shapes)
    caches = [torch.zeros(blocks, 2, BLOCK, config.num_kv_heads, config.head_dim, device=DEV,
                          dtype=torch.bfloat16) for _ in range(config.num_layers)]
    print(f"{args.model} (dummy bf16), {config.num_layers} layers, FlashInfer attention, on "
          f"{torch.cuda.get_device_name()}: copy {bw / 1e12:.2f} TB/s, bf16 matmul {mm / 1e12:.0f} "
          f"TFLOP/s (this run)\n")
    with torch.inference_mode():
        for shape in args.shapes:
            floor = hybrid_floor(config, shape.chunk, shape.decodes, shape.context, mm, bw) * 1e3
            print(f"### {shape.label} (layers only; sequential floor {floor:.2f} ms)\n\n"
                  f"| variant | device ms | against the floor | timed as | difference from one batch |\n"
                  f"| --- | --- | --- | --- | --- |")
            for name, ms, how, diff in measure(model, caches, shape, args.carveouts):
                print(f"| {name} | {ms:.2f} | {ms / floor:.2f}x | {how} | {diff:.1e} |", flush=True)
            print()


if __name__ == "__main__":
    main()

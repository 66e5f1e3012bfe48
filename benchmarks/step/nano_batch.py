"""One iteration as two nano-batches on two streams (NanoFlow's overlap), on the model's own layers.

Every iteration the worker runs is a sum of its GEMMs (at the tensor cores' rate) and its
decodes' attention (at the copy bandwidth), one after the other. Split the batch in two, give
each half its own stream, and one half's memory-bound attention can run while the other half's
GEMMs hold the tensor cores: an iteration could then take less than that sum (issue 22: the
lever left for offline throughput and capacity). The split costs something too: each half reads
the weights, and each GEMM is smaller. This measures both, before the runner learns to do it:
the worker's own NanoBatches (worker_service/nano_batches.py, `--nano-batch-tokens`) on the
model's layers, with FlashInfer attention planned once per nano-batch, each variant's whole
iteration captured in one CUDA graph (as served, the nano-batches run eagerly: compare with
gpu_bench's nano rows for what launches add):
- one batch, through the model's forward;
- two nano-batches in turn on one stream (what the split costs);
- two nano-batches on two streams, the decodes-only one's stream at normal or (as the worker)
  high priority, with cuBLAS leaving 0 or more SMs free (`--carveouts`).
The hidden states of every variant are checked against the one batch's (a split that computes
something else must not pass for a fast one).

  python -m benchmarks.step.nano_batch [--shapes 512+256@640 0+256@640 512+64@1024] [--carveouts 0 16]

Shapes CHUNK+DECODES@CONTEXT: one prompt's first CHUNK tokens beside DECODES decodes at CONTEXT.
Splits: with a chunk, the chunk in one nano-batch and the decodes in the other ("by kind"), and
the chunk with half the decodes beside the other half; without, the decodes in halves.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from benchmarks.kernels.graph_timing import graph_or_eager_ms
from benchmarks.step.driver import measure_copy_bandwidth, measure_matmul_flops
from benchmarks.step.floors import hybrid_floor
from sarathi_common.model_spec import resolve
from worker_service.attention import AttentionMetadata
from worker_service.host_batch import HostBatch
from worker_service.models.loader import load_model
from worker_service.nano_batches import NanoBatches

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


def host_batch(shape: IterationShape, vocab: int) -> HostBatch:
    """The iteration as the runner prepares it: decode rows first, every row's slots."""
    rows, tables = shape.rows, block_tables(shape.rows)
    gen = torch.Generator().manual_seed(0)
    starts, positions, slots = [0], [], []
    for (q, ctx), table in zip(rows, tables, strict=True):
        starts.append(starts[-1] + q)
        positions += range(ctx - q, ctx)
        slots += (table[p // BLOCK] * BLOCK + p % BLOCK for p in range(ctx - q, ctx))
    ids = torch.randint(1, vocab, (starts[-1],), generator=gen).tolist()
    return HostBatch(ids, positions, slots, starts, [c for _, c in rows], tables, [], [])


def measure(model, nano: NanoBatches, caches: list[torch.Tensor], shape: IterationShape,
            carveouts: list[int]) -> list[tuple[str, float, str, float]]:
    """(variant, ms, how timed, relative difference from the one batch) per variant: the one
    batch through the model's forward, then each split through the worker's NanoBatches."""
    batch = host_batch(shape, model.config.vocab_size)
    ids = torch.tensor(batch.input_ids, device=DEV)
    meta = AttentionMetadata.from_host(batch.query_start, batch.context_lens, batch.tables, batch.slots,
                                       BLOCK, DEV)
    model.backend.begin_iteration(meta)
    positions = torch.tensor(batch.positions, device=DEV)
    result: dict[str, torch.Tensor] = {}

    def whole() -> None:
        result["hidden"] = model(ids, positions, caches, meta)

    ms, how = graph_or_eager_ms(whole)
    want = result["hidden"].float()
    out = [("one batch (as the worker without nano-batches)", ms, how, 0.0)]
    for name, rows_a, rows_b in shape.splits():
        planned = nano.plan(batch, (rows_a, rows_b))

        def timed(label: str, streams, planned=planned, name=name) -> None:
            nano.streams = streams

            def split() -> None:
                result["hidden"] = nano.run(planned, ids, caches)
            ms, how = graph_or_eager_ms(split)
            got = result["hidden"].float()
            out.append((f"{name}: {label}", ms, how, ((got - want).norm() / want.norm()).item()))

        timed("in turn, one stream", (None, None))
        for n in carveouts:
            torch._C._set_sm_carveout_experimental(n or None)
            free = f", cuBLAS leaving {n} SMs" if n else ""
            try:
                timed(f"two streams{free}", (torch.cuda.Stream(), torch.cuda.Stream()))
                timed(f"two streams{free}, decodes' stream at high priority (as the worker)",
                      (torch.cuda.Stream(), torch.cuda.Stream(priority=-1)))
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
    model.backend.configure(config.num_heads, config.num_kv_heads, config.head_dim, torch.bfloat16)
    nano = NanoBatches(model, (FlashInferAttention(DEV), FlashInferAttention(DEV)), DEV, torch.bfloat16,
                       1, BLOCK)
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
            for name, ms, how, diff in measure(model, nano, caches, shape, args.carveouts):
                print(f"| {name} | {ms:.2f} | {ms / floor:.2f}x | {how} | {diff:.1e} |", flush=True)
            print()


if __name__ == "__main__":
    main()

"""How much of each iteration the device spends waiting for the scheduler, with and without
overlapped scheduling, measured end to end through the real gRPC services.

For each batch size it starts `sarathi serve`, runs that many concurrent requests (fixed prompt
and output lengths, ignore_eos), reads the per-iteration trace over the Operator API and prints
one table: decode-only iterations' device time, the device's idle gap before each step (CUDA
events on a GPU: from the end of the previous step to the start of this one's model), that gap
as a share of device time plus gaps, and the time between tokens that clients saw. A hybrid row
adds a stream of long prompts beside the decodes. With overlap the engine keeps two plans in
the worker and the worker prepares step i+1 while the device runs step i; without it, each
plan waits for the previous result.

  python -m benchmarks.host.step_overhead --model dummy:llama3-8b --device cuda --batches 1 32 128
  python -m benchmarks.host.step_overhead --batches 1 8          # the embedded model on the CPU
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from rich.console import Console
from rich.table import Table

from benchmarks.serving.server_process import LocalServer, ServerLaunch
from protos import generation_pb2 as pb
from protos import generation_pb2_grpc


@dataclass
class Row:
    workload: str
    overlap: bool
    iterations: int
    busy_ms: float        # the step's device time, median
    idle_ms: float        # the device's idle gap before the step, median
    idle_share: float     # sum(idle) / sum(idle + busy), decode-only steps
    tbt_ms: float         # median gap between streamed tokens, as clients saw it
    replica: int = 1      # which replica's iterations (each overlaps on its own)


def stream_gaps(stub, prompt: list[int], max_tokens: int) -> list[float]:
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=pb.SamplingParams(
        max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    times = [time.perf_counter() for msg in stub.Generate(req) if msg.HasField("chunk")]
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def measure(address: str, batch: int, prompt_len: int, out_len: int, hybrid: bool) -> tuple:
    channel = grpc.insecure_channel(address)
    stub = generation_pb2_grpc.GenerationStub(channel)
    operator = generation_pb2_grpc.OperatorStub(channel)
    stream_gaps(stub, [7] * 16, 4)  # warm-up (graph capture, JIT)
    first_step = operator.GetTrace(pb.GetTraceRequest(limit=1)).iterations[-1].step_id
    prompts = [[(13 * i + j) % 1000 + 10 for j in range(prompt_len)] for i in range(batch)]
    jobs = [(p, out_len) for p in prompts]
    if hybrid:  # long prompts arriving while the batch decodes: hybrid iterations
        jobs += [([(31 * k + j) % 1000 + 10 for j in range(2048)], 2) for k in range(4)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        gaps = [g for gs in pool.map(lambda j: stream_gaps(stub, *j), jobs) for g in gs]
    steps = [it for it in operator.GetTrace(pb.GetTraceRequest()).iterations if it.step_id > first_step]
    channel.close()
    return steps, gaps


def summarize(workload: str, overlap: bool, steps, gaps: list[float], hybrid: bool, batch: int) -> Row:
    # Decode rows count only steps that decode the whole batch (not the ramp up or down).
    chosen = [s for s in steps if s.num_prefill_tokens > 0 and s.num_decode_tokens > 0] if hybrid else \
        [s for s in steps if s.num_prefill_tokens == 0 and s.num_decode_tokens == batch]
    chosen = chosen[1:] or chosen  # the first step has no predecessor to be idle after
    busy = [s.worker_device_ns / 1e6 for s in chosen]
    idle = [s.worker_idle_ns / 1e6 for s in chosen]
    share = sum(idle) / max(1e-9, sum(idle) + sum(busy))
    return Row(workload, overlap, len(chosen), statistics.median(busy or [0]), statistics.median(idle or [0]),
               share, 1000 * statistics.median(gaps or [0]))


def per_replica(workload: str, overlap: bool, steps, gaps: list[float], hybrid: bool,
                batch: int) -> list[Row]:
    """One row per replica: each has its own device and its own idle gaps. A replica's decode
    batch is its share of the requests (its widest decode-only step)."""
    rows = []
    replicas = sorted({s.replica for s in steps})
    for replica in replicas:
        own = [s for s in steps if s.replica == replica]
        width = batch if len(replicas) == 1 else max(
            [s.num_decode_tokens for s in own if s.num_prefill_tokens == 0] or [batch])
        row = summarize(workload, overlap, own, gaps, hybrid, width)
        row.replica = replica
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    # Short prompts, long outputs: most steps decode the whole batch.
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--output-tokens", type=int, default=160)
    ap.add_argument("--chunk-size", type=int, default=512)
    ap.add_argument("--replicas", type=int, default=1,
                    help="data-parallel replicas under the one scheduler (serve --replicas): a row each")
    ap.add_argument("--server-arg", action="append", default=[], help="extra `sarathi serve` argument")
    args = ap.parse_args(argv)
    extra = [*args.server_arg, "--replicas", str(args.replicas)]
    if args.device:
        extra += ["--device", args.device]
    rows: list[Row] = []
    for overlap in (True, False):
        launch = ServerLaunch(chunk_size=args.chunk_size, model=args.model, metrics=False,
                              extra_args=tuple(extra + ([] if overlap else ["--no-overlap"])),
                              startup_timeout_s=900)
        with LocalServer(launch) as server:
            for batch in args.batches:
                steps, gaps = measure(server.address, batch, args.prompt_tokens, args.output_tokens, False)
                rows += per_replica(f"decode, batch {batch}", overlap, steps, gaps, False, batch)
            batch = max(args.batches)
            steps, gaps = measure(server.address, batch, args.prompt_tokens, args.output_tokens, True)
            rows += per_replica(f"hybrid, batch {batch} + 2048-token prompts", overlap, steps, gaps, True,
                                batch)
    table = Table(title=f"Device idle between iterations ({args.model or 'embedded SmolLM2'}, "
                        f"{args.device or 'default device'})")
    for col in ("workload", "overlap", "replica", "iterations", "device ms", "idle ms", "idle %",
                "client TBT ms"):
        table.add_column(col, justify="right")
    for r in sorted(rows, key=lambda r: (r.workload, not r.overlap, r.replica)):
        table.add_row(r.workload, "on" if r.overlap else "off", str(r.replica), str(r.iterations),
                      f"{r.busy_ms:.2f}",
                      f"{r.idle_ms:.3f}", f"{100 * r.idle_share:.1f}", f"{r.tbt_ms:.2f}")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()

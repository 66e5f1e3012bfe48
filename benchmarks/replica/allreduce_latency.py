"""NCCL all-reduce latency between the GPUs of this host, eager and inside a CUDA graph, at the
sizes a tensor-parallel decode step sums (batch x hidden bf16 values, twice per layer): what
separates a TP decode step from the HBM floor of its shards at small batches.

  python -m benchmarks.replica.allreduce_latency [--gpus 2] [--hidden 4096 8192] [--batches 1 64]

One process per GPU (spawned); rank 0 prints the table. Set NCCL_DEBUG=INFO to see the
transport NCCL chose (P2P over NVLink, or shared memory).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist

OPS_PER_GRAPH = 64


def _rank(rank: int, world: int, port: int, sizes: list[tuple[int, int]]) -> None:
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120), device_id=device)
    rows = []
    graphs = []   # kept alive until the process exits (a live graph holds the communicator)
    for batch, hidden in sizes:
        x = torch.randn(batch, hidden, device=device, dtype=torch.bfloat16)
        for _ in range(20):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        eager = []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(100):
                dist.all_reduce(x)
            torch.cuda.synchronize()
            eager.append((time.perf_counter() - t) / 100)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(OPS_PER_GRAPH):
                dist.all_reduce(x)
        graphs.append(graph)
        graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        replays = []
        for _ in range(10):
            dist.barrier()
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            replays.append(start.elapsed_time(end) * 1e-3 / OPS_PER_GRAPH)
        rows.append((batch, hidden, statistics.median(eager), statistics.median(replays)))
    if rank == 0:
        print(f"\nNCCL all-reduce over {world} x {torch.cuda.get_device_name()}, bf16, sum "
              f"(graph: {OPS_PER_GRAPH} in one graph, per all-reduce)\n")
        print("| batch x hidden | bytes | eager | in a CUDA graph |")
        print("| --- | --- | --- | --- |")
        for batch, hidden, e, g in rows:
            print(f"| {batch} x {hidden} | {batch * hidden * 2 / 1024:.0f} KiB | {e * 1e6:.1f} us | "
                  f"{g * 1e6:.1f} us |", flush=True)
    dist.barrier()
    torch.cuda.synchronize()
    os._exit(0)   # skip NCCL's teardown: the graphs above still hold the communicator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    ap.add_argument("--hidden", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    args = ap.parse_args()
    sizes = [(b, h) for h in args.hidden for b in args.batches]
    with socket.socket() as sock:   # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(k, args.gpus, port, sizes)) for k in range(args.gpus)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    if any(p.exitcode != 0 for p in procs):
        raise SystemExit(f"ranks ended with {[p.exitcode for p in procs]}")


if __name__ == "__main__":
    main()

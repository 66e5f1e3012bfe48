"""Where a decode step's device time goes: every kernel of one CUDA-graph replay, grouped.

On a GPU host, from the repo root:
  python -m benchmarks.step.decode_profile [--model llama3-8b] [--batches 1 64] [--context 1024]
For each batch it replays the captured decode graph under torch.profiler and prints one table:
kernel group (matmul, attention, norm, rotary, KV store, activation, sampling, other), kernel
launches, device microseconds per step and share, and for matmuls (weights) and attention (KV)
what the HBM floor allows them. Then the costliest kernels, and the slowest single launches of
one replay with their place in the step (which layer and projection a slow one is).
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.step.driver import (
    BLOCK,
    CONTEXT,
    DEV,
    Driver,
    add_split_decode_arg,
    apply_split_decode_arg,
    measure_copy_bandwidth,
    weight_bytes_read_per_step,
)
from benchmarks.step.floors import kv_bytes
from sarathi_common.model_spec import resolve
from worker_service.attention import make_backend
from worker_service.models.loader import load_model
from worker_service.runner import ModelRunner

# Kernel names (ours, FlashInfer's, cuBLAS's, torch's) to the group they belong to; first match.
GROUPS = (
    ("attention", ("batchdecode", "batchprefill", "flashinfer", "paged_attention", "attn",
                   "decode_split", "merge_splits")),
    ("matmul", ("gemv", "gemm", "sm90_xmma", "cutlass", "nvjet", "matmul", "_mm_")),
    ("norm", ("rms", "norm")),
    ("rotary", ("rotary", "rope")),
    ("kv store", ("store_kv", "kv_store", "reshape_and_cache", "cache")),
    ("activation", ("silu", "act")),
    ("sampling", ("argmax", "max", "sample", "softmax", "topk", "sort")),
)


def group_of(name: str) -> str:
    low = name.lower()
    for group, keys in GROUPS:
        if any(k in low for k in keys):
            return group
    return "other"


def profile_replay(graph: torch.cuda.CUDAGraph, repeats: int) -> list[tuple[str, float]]:
    """(kernel name, device us) for every kernel of `repeats` replays, in launch order."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            graph.replay()
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if e.device_type.name == "CUDA"),
                     key=lambda e: e.time_range.start)
    return [(e.name, e.device_time) for e in kernels]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--backend", default="flashinfer")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--context", type=int, default=CONTEXT)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--top", type=int, default=12, help="also list this many costliest kernels")
    add_split_decode_arg(ap)
    args = ap.parse_args()

    model = load_model(resolve(f"dummy:{args.model}"), make_backend(args.backend, DEV), DEV,
                       torch.bfloat16)
    apply_split_decode_arg(model, args)
    runner = ModelRunner(model, DEV, torch.bfloat16, graph_batch_sizes=tuple(args.batches))
    blocks = (16 << 30) // runner.bytes_per_block(BLOCK)
    runner.init_cache(blocks, BLOCK)
    driver = Driver(runner, blocks, model.config.vocab_size)
    bandwidth = measure_copy_bandwidth()
    weights = weight_bytes_read_per_step(model)
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; weights read per step {weights / 1e9:.2f} GB")

    for batch in args.batches:
        sids = driver.prefill([args.context] * batch)
        for _ in range(3):
            driver.decode_step(sids)
        graph, _ = runner.graphs.graphs[batch]
        events = profile_replay(graph, args.repeats)
        per_group: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
        per_kernel: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
        for name, us in events:
            for table in ((per_group, group_of(name)), (per_kernel, name)):
                entry = table[0][table[1]]
                entry[0] += 1
                entry[1] += us
        total = sum(us for _, us in events) / args.repeats
        kv = kv_bytes(model.config, batch * args.context)
        floor_us = {"matmul": weights / bandwidth * 1e6, "attention": kv / bandwidth * 1e6}
        print(f"\n## batch {batch}, context {args.context}: kernels sum to {total:.0f} us per step "
              f"(floor {(weights + kv) / bandwidth * 1e6:.0f} us)")
        print("| group | launches | us/step | share | floor us | ratio |")
        print("| --- | --- | --- | --- | --- | --- |")
        for group, (count, us) in sorted(per_group.items(), key=lambda kv_: -kv_[1][1]):
            us /= args.repeats
            floor = floor_us.get(group)
            extra = f"{floor:.0f} | {us / floor:.2f}x" if floor else "- | -"
            print(f"| {group} | {count // args.repeats} | {us:.0f} | {us / total:.1%} | {extra} |")
        print("\ncostliest kernels (us per step, launches per step, median launch us):")
        durations: dict[str, list[float]] = defaultdict(list)
        for name, us in events:
            durations[name].append(us)
        for name, (count, us) in sorted(per_kernel.items(), key=lambda kv_: -kv_[1][1])[:args.top]:
            print(f"  {us / args.repeats:8.1f}  x{count // args.repeats:<4d} "
                  f"{statistics.median(durations[name]):7.2f}  {name[:110]}")
        first = events[:len(events) // args.repeats]  # one replay, in launch order
        print("\nslowest launches of one replay (index in the step, us, kernel):")
        for index, (name, us) in sorted(enumerate(first), key=lambda e: -e[1][1])[:args.top]:
            print(f"  {index:4d} {us:9.1f}  {name[:90]}")
        driver.drop_all()


if __name__ == "__main__":
    main()

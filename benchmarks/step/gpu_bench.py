"""GPU benchmark of the worker's ModelRunner on dummy weights of real model shapes.

Drives ModelRunner.execute with real BatchPlans (chunked prefills, decodes, a hybrid batch) and
prints each time against its hardware floor, measured in the same run:
  - decode step at batch 1..128, context 1024, vs (weight bytes + KV bytes read) / copy bandwidth;
  - one prompt's prefill (512 / 2048 / 8192 tokens): time and MFU vs the measured bf16 matmul rate;
  - a hybrid iteration: one 512-token chunk plus 64 decodes at context 1024;
  - Hugging Face transformers `generate` on the same shape, batch 1 and 32, for comparison.
Usage on a GPU host, from the repo root:
  python -m benchmarks.step.gpu_bench [--model llama3-8b] [--backend flashinfer] [--no-hf] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.step.driver import (
    BLOCK,
    CONTEXT,
    DEV,
    Driver,
    add_split_decode_arg,
    apply_split_decode_arg,
    measure_copy_bandwidth,
    measure_matmul_flops,
    weight_bytes_read_per_step,
)
from benchmarks.step.floors import hybrid_floor, kv_bytes, prefill_flops
from benchmarks.step.one_graph import one_graph_seconds
from protos.batch_plan import BatchPlan
from sarathi_common.model_spec import resolve
from worker_service.attention import make_backend
from worker_service.models.loader import hf_config_for, load_model
from worker_service.runner import ModelRunner

DECODE_BATCHES = (1, 8, 32, 64, 128)
HF_PROMPT, HF_NEW = 512, 32  # transformers generate's prompt and new tokens


@dataclass
class DecodeTimes:
    served: float   # steady state with step i+1 launched before step i's tokens are read
    alone: float    # one step by itself: launch, then wait for its tokens
    device: float   # the device's own time per step (CUDA events around the step)


def bench_decode(driver: Driver, batch: int, steps: int, context: int = CONTEXT) -> DecodeTimes:
    sids = driver.prefill([context] * batch)
    for _ in range(3):
        driver.decode_step(sids)
    alone = [driver.decode_step(sids) for _ in range(steps)]
    # As the worker serves: the host prepares and launches step i+1 while the GPU runs step i.
    runner = driver.runner
    device: list[float] = []
    torch.cuda.synchronize()
    t = time.perf_counter()
    previous = None
    for _ in range(steps):
        step = runner.launch(driver.plan([], [(sid, 1) for sid in sids]))
        if previous is not None:
            device.append(runner.finish(previous).timings.device_ns / 1e9)
        previous = step
    device.append(runner.finish(previous).timings.device_ns / 1e9)
    served = (time.perf_counter() - t) / steps
    driver.drop_all()
    return DecodeTimes(served, statistics.median(alone), statistics.median(device))


def bench_prefill(driver: Driver, tokens: int, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):
        sid, ns = driver.add(tokens)
        times.append(driver.execute(driver.plan([ns], [(sid, tokens)])))
        driver.drop_all()
    return statistics.median(times[1:])


# The hybrid iterations of the issue's acceptance: (chunk tokens, decodes, the decodes' context).
HYBRID_SHAPES = ((512, 64, 1024), (2048, 64, 1024), (2048, 128, 4096))
# Small chunks, where launches rather than kernels may bound an iteration: graphs or not.
SMALL_HYBRID_SHAPES = ((64, 16, 1024), (128, 32, 1024), (256, 32, 1024))


@dataclass
class HybridTimes:
    served: float   # steady state: iteration i+1 launched before iteration i's tokens are read
    alone: float    # one iteration by itself: prepare, plan, launch, wait for its tokens


def bench_hybrid(driver: Driver, decodes: int, chunk: int, repeats: int,
                 context: int = CONTEXT) -> HybridTimes:
    """Decodes at `context` plus the first chunk of a fresh, longer prompt (so the chunk samples
    nothing), each iteration with a new prompt; alone, then as the worker serves."""
    sids = driver.cached([context] * decodes)
    times = []
    for _ in range(repeats + 1):
        sid, ns = driver.add(chunk + 64)
        times.append(driver.decode_step(sids, extra=[(sid, chunk)], new=[ns]))
        driver.runner.execute(BatchPlan(driver.step, dropped_seq_ids=[sid]))
        driver.step += 1
        del driver.seqs[sid]
    served = driver.served_hybrid(sids, chunk, 2 * repeats)
    driver.drop_all()
    return HybridTimes(served, statistics.median(times[1:]))


def hybrid_variants(graphs, flashinfer: bool) -> list[HybridVariant]:
    """As served first (piecewise graphs where the runner has them, decodes through the decode
    kernels), then the variants that show what each of those buys."""
    variants = [HybridVariant("served", "", graphs)]
    if graphs is not None:
        variants.append(HybridVariant("eager", ", eager", None))
    if flashinfer:
        variants += [
            HybridVariant("split-kv", ", decodes through our split-KV kernel", graphs, split_max=1 << 20),
            HybridVariant("fa2", ", chunks through FlashInfer's FA2 kernel", graphs, prefill="fa2"),
            HybridVariant("triton", ", chunks through our Triton kernel", graphs, triton_chunks=1 << 20),
            HybridVariant("one-launch", ", one prefill launch for all", graphs, decode_kernels=False)]
    if graphs is not None:
        variants.append(HybridVariant("one-graph", ", one CUDA graph with attention inside (bound)", graphs))
    return variants


def hybrid_rows(driver: Driver, runner: ModelRunner, config, mm: float, bw: float,
                rows: list, results: dict, shapes=HYBRID_SHAPES, small_shapes=SMALL_HYBRID_SHAPES,
                keys: tuple[str, ...] | None = None) -> None:
    """Each shape in each variant whose key is in `keys` (None: all); small shapes as served
    and eager only."""
    backend = runner.backend
    graphs = runner.hybrid_graphs
    flashinfer = hasattr(backend, "hybrid_decode_kernels")
    # one-graph only when asked: it captures a whole iteration, which no default run needs.
    variants = [v for v in hybrid_variants(graphs, flashinfer)
                if (v.key != "one-graph" if keys is None else v.key in keys)]
    small = [(shape, [v for v in variants if v.key in ("served", "eager")]) for shape in small_shapes]
    for (chunk, decodes, context), shape_variants in [(s, variants) for s in shapes] + small:
        floor = hybrid_floor(config, chunk, decodes, context, mm, bw)
        for v in shape_variants:
            runner.hybrid_graphs = v.graphs
            if flashinfer:
                backend.hybrid_decode_kernels = v.decode_kernels
                backend.hybrid_split_max = v.split_max
                backend.set_prefill_backend(v.prefill)
                backend.triton_chunk_max_tokens = v.triton_chunks
            if v.key == "one-graph":
                seconds = one_graph_seconds(driver, decodes, chunk, context, 20)
                times = HybridTimes(seconds, seconds)
            else:
                times = bench_hybrid(driver, decodes, chunk, 5, context)
            rows.append((f"hybrid: {chunk}-token chunk + {decodes} decodes (ctx {context}){v.label}",
                         f"{times.served * 1e3:.2f} ms (alone {times.alone * 1e3:.2f})",
                         f"{floor * 1e3:.2f} ms", f"{times.served / floor:.2f}x floor"))
            key = f"hybrid_{chunk}_{decodes}_{context}{v.label.replace(', ', '_').replace(' ', '_')}"
            results[key] = vars(times)
    runner.hybrid_graphs = graphs
    if flashinfer:
        backend.hybrid_decode_kernels, backend.hybrid_split_max = True, None
        backend.set_prefill_backend("auto")
        backend.triton_chunk_max_tokens = 0


@dataclass(frozen=True)
class HybridVariant:
    """One way to run the hybrid rows: its key (--hybrid-variants), the label's suffix, and
    what differs from serving."""
    key: str
    label: str
    graphs: object                  # the runner's HybridGraphs, or None: eager
    decode_kernels: bool = True     # decodes apart from the chunks (False: one prefill launch)
    split_max: int | None = None    # decodes through our split-KV kernel up to this many
    prefill: str = "auto"           # FlashInfer's prefill backend for the chunks ("auto": as served)
    triton_chunks: int = 0          # chunks of up to this many tokens through our Triton kernel


def bench_hf(model_name: str, batch: int, prompt: int, new_tokens: int) -> float:
    """Seconds per generated step of transformers' generate (random bf16 weights)."""
    from transformers import AutoModelForCausalLM

    hf_config = hf_config_for(resolve(f"dummy:{model_name}"))
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(DEV):
            model = AutoModelForCausalLM.from_config(hf_config).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    ids = torch.randint(1, hf_config.vocab_size, (batch, prompt), device=DEV)
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)

    def run(n: int) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    run(2)
    return (run(new_tokens + 1) - run(1)) / new_tokens


def hybrid_shape(text: str) -> tuple[int, int, int]:
    """CHUNK,DECODES,CONTEXT -> a hybrid iteration's shape."""
    parts = text.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: give CHUNK,DECODES,CONTEXT, e.g. 512,256,640")
    chunk, decodes, context = (int(p) for p in parts)
    return chunk, decodes, context


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--hybrid-graph-tokens", type=int, default=2048,
                    help="iterations with prefill chunks up to this many tokens as piecewise graphs")
    ap.add_argument("--kv-gb", type=float, default=72.0)
    add_split_decode_arg(ap)
    ap.add_argument("--hybrid-only", action="store_true", help="only the ceilings and hybrid rows")
    ap.add_argument("--profile-hybrid", action="store_true",
                    help="also profile each hybrid shape's kernels (benchmarks/step/hybrid_profile.py)")
    ap.add_argument("--hybrid-shape", action="append", type=hybrid_shape, default=[],
                    metavar="CHUNK,DECODES,CONTEXT",
                    help="hybrid rows (and profiles) for these shapes instead of the acceptance ones; "
                         "repeatable (e.g. 512,256,640: the offline workload's steady state)")
    ap.add_argument("--hybrid-variants", nargs="+", metavar="KEY",
                    choices=[v.key for v in hybrid_variants(True, True)],
                    help="time only these ways of running the hybrid rows (default: all but "
                         "one-graph); "
                         "fa2 JIT-compiles a FlashInfer kernel on first use (~1.5 min)")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    shapes = tuple(args.hybrid_shape) or HYBRID_SHAPES
    small_shapes = () if args.hybrid_shape else SMALL_HYBRID_SHAPES
    rows: list[tuple[str, str, str, str]] = []
    results: dict = {"device": torch.cuda.get_device_name(), "model": args.model}

    bw = measure_copy_bandwidth()
    mm = measure_matmul_flops()
    results.update(copy_bw=bw, matmul_flops=mm)
    rows.append(("copy bandwidth (read+write)", f"{bw / 1e12:.2f} TB/s", "", ""))
    rows.append(("bf16 matmul 8192^3", f"{mm / 1e12:.0f} TFLOP/s", "", ""))

    t = time.perf_counter()
    source = resolve(f"dummy:{args.model}")
    model = load_model(source, make_backend(args.backend, DEV), DEV, torch.bfloat16)
    apply_split_decode_arg(model, args)
    backend_name = type(model.backend).__name__
    sizes = tuple(sorted(set(DECODE_BATCHES) | {1, 2, 4}))
    runner = ModelRunner(model, DEV, torch.bfloat16, cuda_graphs=not args.no_graphs,
                         graph_batch_sizes=sizes, hybrid_graph_tokens=args.hybrid_graph_tokens)
    budget = runner.profile_free_memory(8192)
    num_blocks = min(budget, int(args.kv_gb * 2 ** 30)) // runner.bytes_per_block(BLOCK)
    runner.init_cache(num_blocks, BLOCK)
    results.update(load_s=time.perf_counter() - t, kv_budget_bytes=budget, num_blocks=num_blocks,
                   backend=backend_name)
    config = model.config
    driver = Driver(runner, num_blocks, config.vocab_size)
    weights = weight_bytes_read_per_step(model)
    results["weight_bytes_per_step"] = weights

    def decode_row(label: str, b: int) -> DecodeTimes:
        """Times decode steps at batch b, context CONTEXT, and adds their row against the floor."""
        times = bench_decode(driver, b, args.steps)
        floor = (weights + kv_bytes(config, b * CONTEXT)) / bw
        rows.append((label, f"{times.served * 1e3:.2f} ms (alone {times.alone * 1e3:.2f}, "
                            f"GPU {times.device * 1e3:.2f})",
                     f"{floor * 1e3:.2f} ms", f"{times.served / floor:.2f}x floor"))
        return times

    decode = {}
    for b in () if args.hybrid_only else DECODE_BATCHES:
        times = decode_row(f"decode step, batch {b}, context {CONTEXT}", b)
        decode[b] = times.served
        results[f"decode_{b}"] = vars(times)
    results["decode_s"] = decode
    if runner.graphs is not None and not args.hybrid_only:  # what graphs buy
        graphs, runner.graphs = runner.graphs, None
        for b in (1, 64):
            times = bench_decode(driver, b, args.steps)
            rows.append((f"decode step, batch {b}, eager (no CUDA graph)",
                         f"{times.served * 1e3:.2f} ms (alone {times.alone * 1e3:.2f})", "", ""))
            results[f"decode_eager_{b}"] = vars(times)
        runner.graphs = graphs
    split = getattr(model.backend, "split_decode_max_batch", 0)
    if runner.graphs is not None and split and not args.hybrid_only:
        # The same steps with FlashInfer's own decode kernels, to show what split-KV buys.
        model.backend.split_decode_max_batch = 0
        runner.graphs.capture()
        for b in (b for b in DECODE_BATCHES if b <= split):
            times = decode_row(f"decode step, batch {b}, FlashInfer decode (split-KV off)", b)
            results[f"decode_fi_{b}"] = vars(times)
        model.backend.split_decode_max_batch = split
        runner.graphs.capture()

    for n in () if args.hybrid_only else (512, 2048, 8192):
        s = bench_prefill(driver, n, 3)
        flops = prefill_flops(config, n)
        rows.append((f"prefill, one {n}-token prompt", f"{s * 1e3:.1f} ms",
                     f"{flops / mm * 1e3:.1f} ms", f"MFU {flops / s / mm * 100:.0f}%"))
        results[f"prefill_{n}_s"] = s

    hybrid_rows(driver, runner, config, mm, bw, rows, results, shapes, small_shapes,
                tuple(args.hybrid_variants) if args.hybrid_variants else None)
    profiles = []
    if args.profile_hybrid:
        from benchmarks.step.hybrid_profile import profile_hybrid

        for shape in shapes:
            profiles.append(profile_hybrid(driver, config, *shape, mm, bw))
            print(profiles[-1], flush=True)

    if not args.no_hf and not args.hybrid_only:
        import gc

        # Ours at HF's own context (its prompt plus half its new tokens), for a like-for-like ratio.
        ours_at_hf = {b: bench_decode(driver, b, args.steps, HF_PROMPT + HF_NEW // 2).served
                      for b in (1, 32)}
        del driver, runner, model
        gc.collect()
        torch.cuda.empty_cache()
        for b in (1, 32):
            hf = bench_hf(args.model, b, HF_PROMPT, HF_NEW)
            gc.collect()
            torch.cuda.empty_cache()
            ours = ours_at_hf[b]
            floor = (weights + kv_bytes(config, b * (HF_PROMPT + HF_NEW // 2))) / bw
            rows.append((f"HF generate, batch {b} (input {HF_PROMPT}, {HF_NEW} new tokens)",
                         f"{hf * 1e3:.1f} ms/step",
                         f"ours {ours * 1e3:.2f} ms/step at context {HF_PROMPT + HF_NEW // 2} "
                         f"(floor {floor * 1e3:.2f})",
                         f"{b / ours:.0f} vs {b / hf:.0f} tok/s: {hf / ours:.1f}x "
                         f"(at the floor: {hf / floor:.1f}x)"))
            results[f"hf_step_{b}"] = hf
            results[f"ours_at_hf_context_{b}"] = ours

    header = (f"Model {args.model} (dummy bf16 weights), backend {backend_name}"
              f"{f' (split-KV decode up to batch {split})' if split else ''}, "
              f"CUDA graphs {'off' if args.no_graphs else 'on'}, "
              f"hybrid graphs up to {args.hybrid_graph_tokens} tokens, block {BLOCK}, "
              f"on {results['device']}")
    table = [header, "", "| measurement | time | floor | ratio |", "| --- | --- | --- | --- |"]
    table += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    text = "\n".join(table + [""] + profiles)
    print(text, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"gpu_bench_{args.model}.md").write_text(text + "\n")
    (out / f"gpu_bench_{args.model}.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()

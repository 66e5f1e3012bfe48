"""Decode step time of a replica spread over several GPUs (tensor and pipeline parallel), against
the HBM floor of its shards: every rank of a stage reads its shard at once, stages run one after
another, so the floor of a step is the sum over stages of the largest (weights read + KV read) of
a rank of that stage, over the measured copy bandwidth.

Drives rank 0 directly with hand-made plans (benchmarks.step.harness.PlanMaker), as the
scheduler would send them: the batch's prompts are prefilled (up to 8192 tokens a plan), then
`--steps` decode steps are timed one by one, plan to sampled tokens.

On a GPU the KV cache is sized as a served replica sizes it (ReplicaDriver.profile_free_memory:
every rank's budget, for iterations of up to 8192 tokens), so the prefills and decodes below
also check that estimate on a full cache. `--prefill N...` then times one N-token prompt per plan
and gives its MFU over all the replica's GPUs (against the bf16 matmul rate measured here); with
pipeline stages also with `pp` plans in flight (a stage works on the next plan while the later
stage runs this one), the throughput a pipeline is for.

  python -m benchmarks.replica.replica_bench --model llama3-70b --layouts 2x1 1x2 [--prefill 2048 8192]
  python -m benchmarks.replica.replica_bench --device cpu --model tiny --layouts 2x1 1x2 --context 64

`TPxPP` names a layout; each takes TP x PP GPUs of this host. On the CPU there is no floor.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

from benchmarks.replica.launch import local_replica
from benchmarks.step.floors import prefill_flops
from benchmarks.step.harness import BLOCK, PlanMaker
from sarathi_common.model_spec import resolve
from worker_service.attention import make_backend
from worker_service.models.config import ModelConfig
from worker_service.models.llama import LlamaModel
from worker_service.models.loader import hf_config_for
from worker_service.parallel.layout import ReplicaLayout
from worker_service.parallel.replica import RankPart, rank_bytes_per_block

PREFILL_TOKENS = 8192  # at most this many prompt tokens per prefill plan


def rank_weight_bytes(config: ModelConfig, layout: ReplicaLayout, rank: int, elem: int) -> int:
    """Weight bytes a decode step of `rank` reads: its part of the model (a skeleton on the meta
    device, shaped as the rank loads it), all but the embedding table, of which a step reads a
    few rows."""
    with torch.device("meta"):
        whole = LlamaModel(config, make_backend("torch", torch.device("cpu")))
    part = RankPart(layout, rank, group=object(), outbox=None).shape(whole)
    return sum(p.numel() * elem for name, p in part.named_parameters()
               if name != "embed_tokens.weight" or config.tie_word_embeddings)


def floor_seconds(config: ModelConfig, layout: ReplicaLayout, tokens: int, dtype: torch.dtype,
                  bandwidth: float) -> float:
    elem = torch.tensor([], dtype=dtype).element_size()
    per_rank = [rank_weight_bytes(config, layout, k, elem)
                + tokens * rank_bytes_per_block(layout, config, k, 1, dtype)
                for k in range(layout.world_size)]
    return sum(max(per_rank[k] for k in layout.stage_ranks(s)) for s in range(layout.pp_size)) / bandwidth


def decode_steps(driver, batch: int, context: int, steps: int) -> list[float]:
    """Seconds per decode step of `batch` sequences at `context` tokens, one plan at a time."""
    maker = PlanMaker()
    driver.reset()
    per_plan = max(1, PREFILL_TOKENS // context)
    for start in range(0, batch, per_plan):
        driver.execute(maker.new_sequences(min(per_plan, batch - start), context).to_proto()
                       .SerializeToString())
    seqs = list(range(batch))
    plans = [maker.decode(seqs).to_proto().SerializeToString() for _ in range(steps + 2)]
    times = []
    for i, plan in enumerate(plans):
        t = time.perf_counter()
        driver.execute(plan)
        if i >= 2:  # the first two warm up
            times.append(time.perf_counter() - t)
    return times


def prefill_steps(driver, tokens: int, repeats: int, in_flight: int) -> float:
    """Seconds per plan of one `tokens`-token prompt, with up to `in_flight` plans dispatched
    before the oldest is collected (1: one at a time); the first plan warms up."""
    maker = PlanMaker()
    driver.reset()
    plans = [maker.new_sequences(1, tokens).to_proto().SerializeToString() for _ in range(repeats + 1)]
    driver.execute(plans[0])
    pending: list[int] = []
    start = time.perf_counter()
    for plan in plans[1:]:
        pending.append(driver.dispatch(plan))
        if len(pending) == in_flight:
            driver.collect(pending.pop(0))
    for step in pending:
        driver.collect(step)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama3-70b", help="a dummy model name (shapes only)")
    ap.add_argument("--layouts", nargs="+", default=["4x1", "2x2"], help="TPxPP, e.g. 4x1 2x2")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prefill", type=int, nargs="*", default=[],
                    help="also time one prompt of each of these lengths per plan (MFU on a GPU)")
    ap.add_argument("--prefill-repeats", type=int, default=4)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = ModelConfig.from_hf(hf_config_for(resolve(f"dummy:{args.model}")), args.model)
    bandwidth = matmul = None
    if device.type == "cuda":
        from benchmarks.step.driver import measure_copy_bandwidth, measure_matmul_flops

        bandwidth = measure_copy_bandwidth()
        matmul = measure_matmul_flops()
        print(f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}: copy bandwidth "
              f"{bandwidth / 1e12:.2f} TB/s, bf16 matmul 8192^3 {matmul / 1e12:.0f} TFLOP/s (GPU 0)")
    need = max(max(args.batches) * -(-(args.context + args.steps + 8) // BLOCK),
               (args.prefill_repeats + 1) * -(-max(args.prefill, default=0) // BLOCK)) + 64
    prefill_rows: list[str] = []
    print(f"\n{args.model} (dummy {str(dtype).removeprefix('torch.')} weights), context {args.context}, "
          f"median of {args.steps} decode steps, plan to sampled tokens\n")
    print("| layout | batch | step | floor | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for name in args.layouts:
        tp, pp = (int(x) for x in name.lower().split("x"))
        with local_replica(tp, pp, f"dummy:{args.model}", device, dtype) as driver:
            blocks = need
            if device.type == "cuda":  # as a served replica sizes its cache (Describe)
                blocks = driver.profile_free_memory(PREFILL_TOKENS) // driver.bytes_per_block(BLOCK)
                per_rank = blocks * driver.bytes_per_block(BLOCK) / 1e9
                print(f"TP={tp} x PP={pp}: KV cache of {blocks} blocks ({blocks * BLOCK} tokens, "
                      f"{per_rank:.1f} GB on the largest rank), from every rank's budget", flush=True)
                if blocks < need:
                    raise SystemExit(f"the KV budget ({blocks} blocks) is below this run's {need}")
            driver.init_cache(blocks, BLOCK)
            for batch in args.batches:
                step = statistics.median(decode_steps(driver, batch, args.context, args.steps))
                if bandwidth is None:
                    cells = "- | -"
                else:
                    floor = floor_seconds(config, driver.layout, batch * args.context, dtype, bandwidth)
                    cells = f"{floor * 1e3:.2f} ms | {step / floor:.2f}x"
                print(f"| TP={tp} x PP={pp} | {batch} | {step * 1e3:.2f} ms | {cells} |", flush=True)
            for tokens in args.prefill:
                for in_flight in sorted({1, pp}):
                    seconds = prefill_steps(driver, tokens, args.prefill_repeats, in_flight)
                    mfu = "-" if matmul is None else \
                        f"{prefill_flops(config, tokens) / seconds / (tp * pp * matmul) * 100:.0f}%"
                    prefill_rows.append(f"| TP={tp} x PP={pp} | {tokens} | {in_flight} | "
                                        f"{seconds * 1e3:.1f} ms | {tokens / seconds:,.0f} | {mfu} |")
                    print(f"prefill {prefill_rows[-1]}", flush=True)   # the table comes last
        # Free this replica's rank 0 (weights, KV cache, graphs) before the next one loads.
        del driver
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if prefill_rows:
        print(f"\nprefill of one prompt per plan, MFU over all the replica's GPUs "
              f"(mean over {args.prefill_repeats} plans after one warm-up)\n")
        print("| layout | prompt tokens | plans in flight | per plan | tokens/s | MFU |")
        print("| --- | --- | --- | --- | --- | --- |")
        print("\n".join(prefill_rows))


if __name__ == "__main__":
    main()

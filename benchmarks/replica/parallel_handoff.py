"""What a replica's handoff costs per iteration on the CPU: TP=2 and PP=2 against TP=1.

Runs a replica's ranks as processes on this machine (gloo for TP collectives, ZeroMQ for plans
and hidden states), drives rank 0 in this process with hand-made plans (no scheduler, no gRPC),
and prints, per iteration kind (a prefill chunk; a batch of decodes):
  - wall time per iteration, and its ratio to TP=1
  - ZeroMQ: messages and bytes sent by all ranks (plan bytes to every rank, hidden states and
    residual stage to stage, results back to rank 0), and the time rank 0 spends sending and
    waiting
  - collectives: calls and bytes each TP rank contributes (all_reduce of o_proj / down_proj /
    embedding, all_gather of logits), and time in them on rank 0

  python -m benchmarks.replica.parallel_handoff [--layers 8 --hidden 1024 ...]

Each rank runs one torch thread, so TP=2 and PP=2 use two cores where TP=1 uses one.
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from benchmarks.replica.launch import local_replica
from benchmarks.step.harness import BLOCK, PlanMaker
from worker_service.parallel.replica import ReplicaDriver


def measure(tp: int, pp: int, config_path: str, chunk: int, decode_batch: int, iters: int) -> dict:
    out: dict = {}
    with local_replica(tp, pp, f"dummy:{config_path}", torch.device("cpu"), torch.float32,
                       attention="torch") as driver:
        driver.init_cache(4096, BLOCK)
        driver.reset()
        maker = PlanMaker()
        for kind in ("prefill", "decode"):
            if kind == "prefill":   # each iteration: a new sequence's whole prompt, one chunk
                plans = [maker.new_sequences(1, chunk) for _ in range(iters + 1)]
            else:                   # each iteration: one token for each of decode_batch sequences
                driver.execute(maker.new_sequences(decode_batch, 8).to_proto().SerializeToString())
                seqs = list(range(maker.next_seq - decode_batch, maker.next_seq))
                plans = [maker.decode(seqs) for _ in range(iters + 1)]
            plan_bytes = [p.to_proto().SerializeToString() for p in plans]
            driver.execute(plan_bytes[0])   # warm-up, unmeasured
            driver.gather_stats()
            times = []
            for b in plan_bytes[1:]:
                t = time.perf_counter()
                driver.execute(b)
                times.append(time.perf_counter() - t)
            stats = driver.gather_stats()
            out[kind] = dict(ms=statistics.median(times) * 1e3, plan_bytes=len(plan_bytes[-1]),
                             stats=[{k: v / iters for k, v in s.items()} for s in stats])
        if pp > 1:
            out["decode/2x2"] = _pipelined_decode(driver, maker, decode_batch, iters)
    return out


def _pipelined_decode(driver: ReplicaDriver, maker: PlanMaker, decode_batch: int, iters: int) -> dict:
    """The same decode batch as two half-batch micro-batches, both in flight in the pipeline:
    ms for every sequence to get one token (one pair of micro-batches)."""
    driver.execute(maker.new_sequences(decode_batch, 8).to_proto().SerializeToString())
    seqs = list(range(maker.next_seq - decode_batch, maker.next_seq))
    halves = [seqs[: decode_batch // 2], seqs[decode_batch // 2:]]
    pairs = [[maker.decode(h).to_proto().SerializeToString() for h in halves] for _ in range(iters + 1)]
    for b in pairs[0]:                    # warm-up
        driver.execute(b)
    driver.gather_stats()
    flat = [b for pair in pairs[1:] for b in pair]
    steps: queue.SimpleQueue[int] = queue.SimpleQueue()
    start = time.perf_counter()
    feeder = threading.Thread(target=lambda: [steps.put(driver.dispatch(b)) for b in flat])
    feeder.start()
    for _ in flat:
        driver.collect(steps.get())
    elapsed = time.perf_counter() - start
    feeder.join()
    stats = driver.gather_stats()
    return dict(ms=elapsed / iters * 1e3, plan_bytes=len(flat[-1]),
                stats=[{k: v / iters for k, v in s.items()} for s in stats])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--chunk", type=int, default=256, help="tokens of the prefill chunk")
    ap.add_argument("--decode-batch", type=int, default=32, help="sequences per decode iteration")
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    config = dict(model_type="llama", vocab_size=args.vocab, hidden_size=args.hidden,
                  intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                  num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, rms_norm_eps=1e-5,
                  max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=False,
                  eos_token_id=0)
    path = Path(tempfile.mkdtemp()) / "config.json"
    path.write_text(json.dumps(config))
    print(f"model: {args.layers} layers, hidden {args.hidden}, {args.heads} heads / {args.kv_heads} KV, "
          f"vocab {args.vocab}, float32; prefill chunk {args.chunk} tokens, decode batch "
          f"{args.decode_batch}; median of {args.iters} iterations; one torch thread per rank")
    results = {name: measure(tp, pp, str(path), args.chunk, args.decode_batch, args.iters)
               for name, tp, pp in (("TP=1", 1, 1), ("TP=2", 2, 1), ("PP=2", 1, 2))}
    base = results["TP=1"]
    header = (f"{'layout':6} {'iteration':9} {'ms/iter':>8} {'vs TP=1':>7} {'plan B':>6} {'zmq msgs':>8} "
              f"{'zmq KB':>8} {'send ms':>7} {'transit ms':>10} {'unpack ms':>9} {'coll calls':>10} "
              f"{'coll KB':>8} {'coll ms':>8}")
    print(header)
    print("-" * len(header))
    for name, res in results.items():
        for kind in res:
            m = res[kind]

            def total(key: str, m=m) -> float:
                return sum(x[key] for x in m["stats"])

            r0 = m["stats"][0]
            ratio = m["ms"] / base[kind.split("/")[0]]["ms"]
            print(f"{name:6} {kind:9} {m['ms']:8.2f} {ratio:6.2f}x {m['plan_bytes']:6d} "
                  f"{total('zmq_messages'):8.1f} {total('zmq_bytes') / 1e3:8.1f} "
                  f"{total('zmq_send_ns') / 1e6:7.3f} {total('hidden_transit_ns') / 1e6:10.3f} "
                  f"{total('hidden_unpack_ns') / 1e6:9.3f} {r0['collective_calls']:10.1f} "
                  f"{r0['collective_bytes'] / 1e3:8.1f} {r0['collective_ns'] / 1e6:8.3f}")
    print("""decode/2x2: the decode batch as two half-batch micro-batches, both in flight (PP only);
its numbers are per pair, i.e. per token for every sequence, as the decode rows are.
per iteration. zmq: messages, bytes and send time (serialise + queue) of all ranks together:
plan bytes to every other rank, hidden states + residual stage to stage, the result to rank 0.
transit: hidden states from send until the receiver's mailbox thread had them; unpack: bytes to
tensors. coll: all_reduce (o_proj, down_proj per layer; embedding) and all_gather (logits) as
one TP rank sees them: calls, bytes it contributes, time inside (including waiting for the
slower rank).""")


if __name__ == "__main__":
    main()

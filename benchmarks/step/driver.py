"""What the step benchmarks share: the device, the measured ceilings (copy bandwidth, bf16
matmul rate), a minimal driver of ModelRunner with real BatchPlans, and the split-KV option."""

from __future__ import annotations

import argparse
import time

import torch

from protos.batch_plan import BatchPlan, NewSequence, SamplingOptions
from worker_service.runner import ModelRunner

DEV = torch.device("cuda")
BLOCK = 16
CONTEXT = 1024


# --- ceilings -------------------------------------------------------------------------------
def measure_copy_bandwidth() -> float:
    """Bytes read plus written per second for a large device-to-device copy."""
    import triton.testing

    src = torch.randn(1 << 28, device=DEV)  # 1 GiB
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() * 4 / (ms * 1e-3)


def measure_matmul_flops(n: int = 8192) -> float:
    import triton.testing

    a = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=100, rep=500, return_mode="median")
    return 2 * n ** 3 / (ms * 1e-3)


# --- driving the runner ---------------------------------------------------------------------
class Driver:
    """A minimal scheduler: owns block allocation and sequence ids, builds BatchPlans."""

    def __init__(self, runner: ModelRunner, num_blocks: int, vocab: int) -> None:
        self.runner = runner
        self.free = list(range(num_blocks - 1, -1, -1))
        self.vocab = vocab
        self.step = 0
        self.next_id = 0
        self.seqs: dict[int, dict] = {}
        self.gen = torch.Generator().manual_seed(0)
        self.pending_drops: list[int] = []  # gone from self.seqs, not yet dropped by a plan

    def _blocks_for(self, sid: int, upto: int) -> list[int]:
        s = self.seqs[sid]
        need = -(-upto // BLOCK) - s["blocks"]
        s["blocks"] += need
        return [self.free.pop() for _ in range(need)]

    def add(self, prompt_len: int) -> tuple[int, NewSequence]:
        sid = self.next_id
        self.next_id += 1
        tokens = torch.randint(1, self.vocab, (prompt_len,), generator=self.gen).tolist()
        self.seqs[sid] = dict(len=prompt_len, prompt=prompt_len, computed=0, blocks=0)
        return sid, NewSequence(sid, tokens, [], SamplingOptions(), num_prompt_tokens=prompt_len)

    def plan(self, new: list[NewSequence], work: list[tuple[int, int]],
             dropped: list[int] = ()) -> BatchPlan:
        """work: (seq_id, tokens to schedule)."""
        plan = BatchPlan(self.step, dropped_seq_ids=list(dropped), new_sequences=new)
        self.step += 1
        for sid, n in work:
            s = self.seqs[sid]
            plan.schedule(sid, s["computed"], n, self._blocks_for(sid, s["computed"] + n))
            s["computed"] += n
        return plan

    def execute(self, plan: BatchPlan) -> float:
        """Wall seconds of one execute (it ends in a host sync: the sampled tokens)."""
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = self.runner.execute(plan)
        dt = time.perf_counter() - t
        for sid in out.seq_ids:
            self.seqs[sid]["len"] += 1
        return dt

    def drop_all(self) -> None:
        dropped = list(self.seqs) + self.pending_drops
        self.pending_drops = []
        self.runner.execute(BatchPlan(self.step, dropped_seq_ids=dropped))
        self.step += 1
        self.seqs.clear()
        self.free = list(range(self.runner.num_blocks - 1, -1, -1))

    def prefill(self, prompt_lens: list[int], chunk: int = 8192) -> list[int]:
        """Registers and fully prefills sequences, `chunk` tokens per iteration."""
        pending = []
        new = []
        for n in prompt_lens:
            sid, ns = self.add(n)
            pending.append(sid)
            new.append(ns)
        while pending:
            budget, work = chunk, []
            for sid in pending:
                s = self.seqs[sid]
                n = min(s["prompt"] - s["computed"], budget)
                if n == 0:
                    continue
                work.append((sid, n))
                budget -= n
                if budget == 0:
                    break
            self.execute(self.plan(new, work))
            new = []
            pending = [sid for sid in pending if self.seqs[sid]["computed"] < self.seqs[sid]["prompt"]]
        return [sid for sid in self.seqs]

    def cached(self, prompt_lens: list[int]) -> list[int]:
        """Sequences whose prompts but the last token are already in the cache, as a prefix
        hit registers them (the KV holds whatever the blocks held: timing does not care), so
        long contexts cost no prefill. Their first step is a decode."""
        sids, new = [], []
        for n in prompt_lens:
            sid, ns = self.add(n)
            ns.num_computed_tokens = n - 1
            ns.block_table = self._blocks_for(sid, n - 1)
            self.seqs[sid]["computed"] = n - 1
            sids.append(sid)
            new.append(ns)
        self.execute(self.plan(new, [(sid, 1) for sid in sids]))
        return sids

    def decode_step(self, sids: list[int], extra: list[tuple[int, int]] = (),
                    new: list[NewSequence] = ()) -> float:
        return self.execute(self.plan(list(new), [(sid, 1) for sid in sids] + list(extra)))

    def served_hybrid(self, sids: list[int], chunk: int, steps: int) -> float:
        """Seconds per iteration of `steps` hybrid iterations as the worker serves them
        (iteration i+1 launched before iteration i's tokens are read): the decodes `sids` plus
        the first `chunk` tokens of a fresh, longer prompt each time (so the chunk samples
        nothing). The last prompt is left to drop_all, so that nothing but the iterations
        runs between the first launch and the last tokens (a profile of this call sees them
        alone)."""
        runner = self.runner
        torch.cuda.synchronize()
        t = time.perf_counter()
        previous, dropped = None, []
        for _ in range(steps):
            sid, ns = self.add(chunk + 64)
            plan = self.plan([ns], [(s, 1) for s in sids] + [(sid, chunk)], dropped=dropped)
            del self.seqs[sid]   # dropped by the next plan, while this one may still run
            dropped = [sid]
            step = runner.launch(plan)
            if previous is not None:
                runner.finish(previous)
            previous = step
        runner.finish(previous)
        served = (time.perf_counter() - t) / steps
        self.pending_drops += dropped
        return served


# --- the measurements -----------------------------------------------------------------------
def weight_bytes_read_per_step(model) -> int:
    """Every parameter a decode step reads: all but the embedding table (a few rows)."""
    total = 0
    for name, p in model.named_parameters():
        if name == "embed_tokens.weight" and not model.config.tie_word_embeddings:
            continue
        total += p.numel() * p.element_size()
    return total


def add_split_decode_arg(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--split-decode-max-batch", type=int, default=None,
                    help="FlashInfer backend: decode batches up to this size run our split-KV "
                         "kernel (0: none; default: the backend's own)")


def apply_split_decode_arg(model, args: argparse.Namespace) -> None:
    if args.split_decode_max_batch is not None:
        model.backend.split_decode_max_batch = args.split_decode_max_batch

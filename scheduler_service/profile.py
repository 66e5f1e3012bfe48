"""A short start-up profile of a worker: a handful of synthetic iterations of different shapes,
run through the ordinary Step stream before the worker serves, whose measured device times
warm-start the latency model (policies/latency_model.py) of an SLO budget.

The sequences are dummies: one repeated token, KV blocks of the still empty cache, a context
"already computed" (its KV is whatever the cache holds: the timing does not depend on values).
Each shape runs once to warm up (lazy initialisation, graph capture) and then is measured; every
dummy is dropped before the next shape and after the last, so the worker starts serving clean.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from protos.batch_plan import BatchPlan, NewSequence, SamplingOptions, StepOutput
from scheduler_service.policies.latency_model import IterationShape

log = logging.getLogger("sarathi.profile")

# Far above any id the frontend hands out; the dummies are dropped before serving anyway.
_FIRST_SEQ_ID = 1 << 60


@dataclass(frozen=True)
class ProfileShape:
    """decodes x (context each); chunks x (tokens each, after context each)."""

    num_decodes: int = 0
    decode_context: int = 0
    num_chunks: int = 0
    chunk_tokens: int = 0
    chunk_context: int = 0

    @property
    def num_kv_tokens(self) -> int:
        return (self.num_decodes * (self.decode_context + 1)
                + self.num_chunks * (self.chunk_context + self.chunk_tokens))

    def shape(self) -> IterationShape:
        s = IterationShape()
        for _ in range(self.num_decodes):
            s = s.with_decode(self.decode_context + 1)
        for _ in range(self.num_chunks):
            s = s.with_chunk(self.chunk_context, self.chunk_tokens)
        return s


def profile_shapes(token_budget: int, max_batch_size: int, kv_tokens: int,
                   max_model_len: int) -> list[ProfileShape]:
    """Shapes spanning what the budget can form: decode-only at short and long contexts, one or
    two prefill chunks with and without context, and hybrids; each scaled down to fit the cache
    and the model's context."""
    b = token_budget
    ctx = max(16, min(max_model_len - b - 1, kv_tokens // 8, 4096))
    many = max(1, min(max_batch_size, b // 2, 64))
    wanted = [
        ProfileShape(num_decodes=1, decode_context=64),
        ProfileShape(num_decodes=many, decode_context=64),
        ProfileShape(num_decodes=many, decode_context=ctx),
        ProfileShape(num_decodes=max(1, many // 4), decode_context=ctx),
        ProfileShape(num_chunks=1, chunk_tokens=max(1, b // 8)),
        ProfileShape(num_chunks=1, chunk_tokens=max(1, b // 2)),
        ProfileShape(num_chunks=1, chunk_tokens=b),
        ProfileShape(num_chunks=1, chunk_tokens=max(1, b // 2), chunk_context=ctx),
        ProfileShape(num_chunks=2, chunk_tokens=max(1, b // 4)),
        ProfileShape(num_decodes=many // 2, decode_context=ctx // 2, num_chunks=1,
                     chunk_tokens=max(1, b // 2)),
        ProfileShape(num_decodes=many, decode_context=ctx // 4, num_chunks=1,
                     chunk_tokens=max(1, b - many)),
        ProfileShape(num_decodes=max(1, many // 4), decode_context=64, num_chunks=1,
                     chunk_tokens=max(1, b // 4), chunk_context=ctx // 2),
    ]
    fitting = []
    for s in wanted:
        for _ in range(8):   # too big for a small cache or context: halve it until it fits
            if _fits(s, b, kv_tokens, max_model_len):
                fitting.append(s)
                break
            s = ProfileShape(max(1, s.num_decodes // 2) if s.num_decodes else 0, s.decode_context // 2,
                             s.num_chunks, max(1, s.chunk_tokens // 2), s.chunk_context // 2)
    return fitting


def _fits(s: ProfileShape, budget: int, kv_tokens: int, max_model_len: int) -> bool:
    return (s.num_decodes + s.num_chunks * s.chunk_tokens <= budget and s.num_kv_tokens <= kv_tokens
            and max(s.decode_context + 1, s.chunk_context + s.chunk_tokens) <= max_model_len)


class _Dummies:
    """Builds the plans of the profile: fresh sequences per run, the last run's dropped."""

    def __init__(self, block_size: int, num_blocks: int, token_id: int) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.token_id = token_id
        self.next_seq = _FIRST_SEQ_ID
        self.next_step = 1
        self.live: list[int] = []

    def plan(self, shape: ProfileShape) -> BatchPlan:
        plan = BatchPlan(step_id=self.next_step, dropped_seq_ids=self.live)
        self.next_step += 1
        self.live = []
        next_block = 0
        seqs = [(shape.decode_context, 1)] * shape.num_decodes + \
            [(shape.chunk_context, shape.chunk_tokens)] * shape.num_chunks
        for context, n in seqs:
            length = context + n
            count = -(-length // self.block_size)
            table = [(next_block + i) % self.num_blocks for i in range(count)]
            next_block += count
            seq_id = self.next_seq
            self.next_seq += 1
            self.live.append(seq_id)
            plan.new_sequences.append(NewSequence(seq_id, [self.token_id] * length, table,
                                                  SamplingOptions(), length, context))
            plan.schedule(seq_id, context, n, [])
        return plan

    def drop_all(self) -> BatchPlan:
        plan = BatchPlan(step_id=self.next_step, dropped_seq_ids=self.live)
        self.next_step += 1
        self.live = []
        return plan


def profile_worker(run: Callable[[BatchPlan], StepOutput], *, block_size: int, num_blocks: int,
                   token_budget: int, max_batch_size: int, max_model_len: int, vocab_size: int,
                   repeats: int = 2, max_seconds: float = 20.0,
                   clock: Callable[[], float] = time.monotonic) -> list[tuple[IterationShape, float]]:
    """Runs the profile through `run` (one plan in, its result out, in order); returns the
    (shape, measured device ms) samples. Shapes go smallest first and the profile stops after
    max_seconds (a slow device, e.g. a CPU, then gets fewer: the online fit fills in)."""
    dummies = _Dummies(block_size, num_blocks, token_id=min(100, vocab_size - 1))
    samples: list[tuple[IterationShape, float]] = []
    shapes = profile_shapes(token_budget, max_batch_size, num_blocks * block_size, max_model_len)
    deadline = clock() + max_seconds
    for shape in sorted(shapes, key=lambda s: s.num_kv_tokens + 8 * s.num_chunks * s.chunk_tokens):
        if clock() > deadline:
            break
        run(dummies.plan(shape))   # warm-up: first use of a shape may initialise or capture
        for _ in range(repeats):
            result = run(dummies.plan(shape))
            if result.timings.device_ns > 0:
                samples.append((shape.shape(), result.timings.device_ns / 1e6))
    run(dummies.drop_all())
    log.info("profiled %d iterations of %d shapes", len(samples), len(samples) // max(1, repeats))
    return samples

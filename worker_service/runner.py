"""Executes one BatchPlan: per-sequence state, plan -> input tensors, forward, sample.

The runner makes no decisions: it checks that the plan agrees with its own state (token counts,
block tables) and fails loudly when it does not.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from protos.batch_plan import BatchPlan, SamplingOptions, StepOutput, StepTimings
from worker_service.attention import AttentionMetadata
from worker_service.models.llama import LlamaModel
from worker_service.sampler import sample


class PlanError(ValueError):
    """The plan contradicts the worker's state: a scheduler bug or a lost message."""


@dataclass
class SequenceState:
    token_ids: list[int]        # prompt + every token sampled so far
    num_prompt_tokens: int
    block_table: list[int]
    num_computed_tokens: int
    sampling: SamplingOptions


class ModelRunner:
    def __init__(self, model: LlamaModel, device: torch.device, dtype: torch.dtype) -> None:
        self.model = model
        self.config = model.config
        self.device = device
        self.dtype = dtype
        self.block_size = 0
        self.num_blocks = 0
        self.kv_caches: list[torch.Tensor] = []
        self.seqs: dict[int, SequenceState] = {}
        self.generator = torch.Generator(device=device).manual_seed(0)

    # --- cache ------------------------------------------------------------------------------
    def bytes_per_block(self, block_size: int) -> int:
        c = self.config
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return c.num_layers * 2 * block_size * c.num_kv_heads * c.head_dim * elem

    def init_cache(self, num_blocks: int, block_size: int) -> int:
        c = self.config
        self.kv_caches = []  # free the old cache before allocating the new one
        self.kv_caches = [
            torch.zeros(num_blocks, 2, block_size, c.num_kv_heads, c.head_dim,
                        device=self.device, dtype=self.dtype)
            for _ in range(c.num_layers)
        ]
        self.block_size, self.num_blocks = block_size, num_blocks
        self.seqs.clear()
        return num_blocks * self.bytes_per_block(block_size)

    # --- one iteration ----------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, plan: BatchPlan) -> StepOutput:
        t0 = time.perf_counter_ns()
        if not self.kv_caches:
            raise PlanError("Step before InitCache: allocate the KV cache first")
        self._apply_membership(plan)
        batch = self._prepare(plan)
        t1 = time.perf_counter_ns()
        seq_ids: list[int] = []
        tokens: list[int] = []
        if batch is not None:
            input_ids, positions, meta, sample_rows, sample_seqs = batch
            hidden = self.model(input_ids, positions, self.kv_caches, meta)
            logits = self.model.compute_logits(hidden[sample_rows]) if sample_seqs else None
            t2 = time.perf_counter_ns()
            if logits is not None:
                states = [self.seqs[s] for s in sample_seqs]
                tokens = sample(logits, [s.sampling for s in states],
                                [len(s.token_ids) - s.num_prompt_tokens for s in states],
                                self.generator)
                for state, tok in zip(states, tokens, strict=True):
                    state.token_ids.append(tok)
                seq_ids = sample_seqs
        else:
            t2 = time.perf_counter_ns()
        t3 = time.perf_counter_ns()
        return StepOutput(plan.step_id, seq_ids, tokens,
                          StepTimings(prepare_ns=t1 - t0, forward_ns=t2 - t1, sample_ns=t3 - t2))

    def _apply_membership(self, plan: BatchPlan) -> None:
        for seq_id in plan.dropped_seq_ids:
            self.seqs.pop(seq_id, None)
        for new in plan.new_sequences:
            if new.seq_id in self.seqs:
                raise PlanError(f"sequence {new.seq_id} registered twice")
            if not 0 < new.num_prompt_tokens <= len(new.token_ids):
                raise PlanError(f"sequence {new.seq_id}: {new.num_prompt_tokens} prompt tokens "
                                f"of {len(new.token_ids)}")
            self.seqs[new.seq_id] = SequenceState(
                list(new.token_ids), new.num_prompt_tokens, list(new.block_table), 0, new.sampling)

    def _prepare(self, plan: BatchPlan):
        """Plan -> (input_ids, positions, metadata, rows to sample, their seq ids)."""
        if not plan.seq_ids:
            return None
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        context_lens: list[int] = []
        tables: list[list[int]] = []
        sample_rows: list[int] = []
        sample_seqs: list[int] = []
        offset = 0
        for i, seq_id in enumerate(plan.seq_ids):
            state = self.seqs.get(seq_id)
            if state is None:
                raise PlanError(f"step {plan.step_id}: unknown sequence {seq_id}")
            count = plan.new_block_counts[i]
            state.block_table.extend(plan.new_block_ids[offset:offset + count])
            offset += count
            start, n = plan.num_computed_tokens[i], plan.num_scheduled_tokens[i]
            if start != state.num_computed_tokens:
                raise PlanError(f"step {plan.step_id}: sequence {seq_id} has "
                                f"{state.num_computed_tokens} computed tokens, plan says {start}")
            end = start + n
            if n < 1 or end > len(state.token_ids):
                raise PlanError(f"step {plan.step_id}: sequence {seq_id} schedules [{start}, {end}) "
                                f"but knows {len(state.token_ids)} tokens")
            if end > len(state.block_table) * bs:
                raise PlanError(f"step {plan.step_id}: sequence {seq_id} needs {end} slots, "
                                f"has {len(state.block_table)} blocks")
            input_ids.extend(state.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(state.block_table[p // bs] * bs + p % bs for p in range(start, end))
            query_start.append(query_start[-1] + n)
            context_lens.append(end)
            tables.append(state.block_table)
            state.num_computed_tokens = end
            if end == len(state.token_ids):
                sample_rows.append(query_start[-1] - 1)
                sample_seqs.append(seq_id)
        width = max(len(t) for t in tables)
        table_tensor = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        dev = self.device
        meta = AttentionMetadata(
            query_start=torch.tensor(query_start, dtype=torch.int32).to(dev, non_blocking=True),
            context_lens=torch.tensor(context_lens, dtype=torch.int32).to(dev, non_blocking=True),
            block_tables=table_tensor.to(dev, non_blocking=True),
            slot_mapping=torch.tensor(slots, dtype=torch.int64).to(dev, non_blocking=True),
            block_size=bs,
            query_start_host=query_start,
            context_lens_host=context_lens,
            num_decode_only=query_start[-1] == len(context_lens),
        )
        ids = torch.tensor(input_ids, dtype=torch.int64).to(dev, non_blocking=True)
        pos = torch.tensor(positions, dtype=torch.int64).to(dev, non_blocking=True)
        rows = torch.tensor(sample_rows, dtype=torch.int64).to(dev, non_blocking=True)
        return ids, pos, meta, rows, sample_seqs

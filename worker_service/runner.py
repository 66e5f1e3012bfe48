"""Executes one BatchPlan: per-sequence state, plan -> input tensors, forward, sample.

The runner makes no decisions: it checks that the plan agrees with its own state (token counts,
block tables) and fails loudly when it does not. A single-process worker serves it directly
(the executor interface, executor.py); each rank of a parallel replica runs a StageRunner.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch

from protos import worker_pb2
from protos.batch_plan import BatchPlan, SamplingOptions, StepOutput, StepTimings
from worker_service import memory
from worker_service.attention import AttentionMetadata
from worker_service.cuda_graphs import DEFAULT_BATCH_SIZES, DecodeGraphs, HybridGraphs
from worker_service.executor import PlanError
from worker_service.host_batch import HostBatch
from worker_service.kv_swap import HostKVCache, SwapError, apply_swaps
from worker_service.models.llama import LlamaModel
from worker_service.sampler import sample
from worker_service.upload import upload

log = logging.getLogger("sarathi.worker")


@dataclass
class PendingToken:
    """The last token sampled for a sequence, as the device holds it: row `row` of `tokens`,
    to become token_ids[index] once the host has read it back."""

    tokens: torch.Tensor
    row: int
    index: int


@dataclass
class SequenceState:
    token_ids: list[int]        # prompt + every token sampled so far (-1 while still in flight)
    num_prompt_tokens: int
    block_table: list[int]
    num_computed_tokens: int
    sampling: SamplingOptions
    pending: PendingToken | None = None


@dataclass
class LaunchedStep:
    """A step queued on the device; finish() turns it into the StepOutput."""

    step_id: int
    launched_ns: int
    seq_ids: list[int] = field(default_factory=list)
    states: list[SequenceState] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)   # where each token goes in its state
    tokens: torch.Tensor | None = None                  # host copy (pinned on a GPU)
    begin: torch.cuda.Event | None = None               # just before the model's first kernel
    end: torch.cuda.Event | None = None                 # after the copy of the tokens
    timings: StepTimings = field(default_factory=StepTimings)


class ModelRunner:
    depth = 1   # no pipeline: one micro-batch at a time (executor.py)

    def __init__(self, model: LlamaModel, device: torch.device, dtype: torch.dtype, *,
                 cuda_graphs: bool | None = None,
                 graph_batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
                 hybrid_graph_tokens: int = 0) -> None:
        """cuda_graphs: capture decode-only iterations as CUDA graphs (at init_cache); None means
        on for CUDA devices, off elsewhere. hybrid_graph_tokens > 0: iterations with prefill
        chunks of up to that many tokens run as piecewise graphs (HybridGraphs; captured only
        when cuda_graphs is on, else the same pieces run eagerly)."""
        self.model = model
        self.config = model.config
        self.device = device
        self.dtype = dtype
        self.backend = model.backend
        c = self.config
        self.backend.configure(c.num_heads, c.num_kv_heads, c.head_dim, dtype)
        self.use_cuda_graphs = device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.graph_batch_sizes = graph_batch_sizes
        self.graphs: DecodeGraphs | None = None
        # A pipeline stage or a sharded model runs its own forward: whole models only.
        self.hybrid_graph_tokens = hybrid_graph_tokens if type(model) is LlamaModel else 0
        self.hybrid_graphs: HybridGraphs | None = None
        # Tokens of the largest step this runner expects (profile_free_memory's worst case).
        self.max_step_tokens = max(hybrid_graph_tokens, 2048)
        # Rows the largest step samples (one per sequence; the scheduler says at Describe).
        self.max_sampled_rows = memory.LOGIT_ROWS
        self.block_size = 0
        self.num_blocks = 0
        self.kv_caches: list[torch.Tensor] = []
        self.host_cache: HostKVCache | None = None
        self.seqs: dict[int, SequenceState] = {}
        self.generator = torch.Generator(device=device).manual_seed(0)
        self._last_begin: torch.cuda.Event | None = None       # of the last launched step
        self._last_end_event: torch.cuda.Event | None = None   # of the last finished step
        self._last_end_ns = 0

    def reset(self) -> None:
        """A new scheduler: forget every sequence and any step still in flight."""
        self._drain()
        self.seqs.clear()
        self._last_end_event, self._last_end_ns = None, 0

    def stop(self) -> None:
        """Nothing to stop: the runner lives and ends with the service's process."""

    # --- cache ------------------------------------------------------------------------------
    def bytes_per_block(self, block_size: int) -> int:
        c = self.config
        return memory.kv_block_bytes(c.num_layers, c.num_kv_heads, c.head_dim, block_size, self.dtype)

    def init_cache(self, num_blocks: int, block_size: int, num_host_blocks: int = 0) -> int:
        """Allocates the paged KV cache, and a host cache of num_host_blocks for swapping."""
        c = self.config
        self.kv_caches = []  # free the old cache (and graphs that point into it) first
        self.graphs = self.hybrid_graphs = None
        self.kv_caches = [
            torch.zeros(num_blocks, 2, block_size, c.num_kv_heads, c.head_dim,
                        device=self.device, dtype=self.dtype)
            for _ in range(c.num_layers)
        ]
        self.block_size, self.num_blocks = block_size, num_blocks
        self.host_cache = HostKVCache(num_host_blocks, self.kv_caches) if num_host_blocks else None
        self.reset()
        # Each start-up phase is timed in the log: together they are the worker's restart time.
        phase = time.perf_counter()

        def done(what: str) -> None:
            nonlocal phase
            now = time.perf_counter()
            log.info("worker: %s in %.1f s", what, now - phase)
            phase = now

        if self.use_cuda_graphs:
            max_blocks = -(-c.max_model_len // block_size)
            self.graphs = DecodeGraphs(self.model, self.backend, self.kv_caches, block_size,
                                       max_blocks, self.device, self.graph_batch_sizes)
            self.graphs.capture()
            done(f"{len(self.graphs.graphs)} decode graphs captured")
        if self.hybrid_graph_tokens:
            capture = self.use_cuda_graphs and self.device.type == "cuda"
            self.hybrid_graphs = HybridGraphs(self.model, self.kv_caches, block_size, self.device,
                                              self.hybrid_graph_tokens, capture)
            if capture:
                self.hybrid_graphs.capture()
                done(f"hybrid graphs for {len(self.hybrid_graphs.buckets)} token counts captured")
        if self.device.type == "cuda" and type(self.model) is LlamaModel:
            self._load_logit_kernels()
            done(f"LM head kernels for 1-{self.max_sampled_rows} rows loaded")
        # Eager allocations (logits, sampling, metadata, uploads) of the largest step, cached.
        memory.warm_allocators(self.device, memory.activation_bytes_estimate(
            c, self.dtype, self.max_step_tokens, samples=True, rows=self.max_sampled_rows))
        if self.device.type == "cuda":
            done("allocator caches grown")
        return num_blocks * self.bytes_per_block(block_size)

    @torch.inference_mode()
    def _load_logit_kernels(self) -> None:
        """The LM head once for every row count a step can sample (max_sampled_rows). cuBLAS
        picks its kernel by the row count, and CUDA loads a kernel on its first launch, which
        waits for the whole device: on an H200, row counts no decode graph had covered (49 rows
        beside 48 decodes, 73 beside 72, ...) held the host for the iteration in flight, and
        every stream missed a turn; offline runs of 512 sequences per step showed the same
        pattern while their batch grew (benchmarks/README.md; not yet confirmed on a GPU).
        The bare matmul (bf16 out): the kernel choice is the same, the memory half."""
        rows_max = self.max_sampled_rows
        hidden = torch.zeros(rows_max, self.config.hidden_size, dtype=self.dtype, device=self.device)
        for rows in range(1, rows_max + 1):
            self.model.lm_head(hidden[:rows])
        torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def profile_free_memory(self, max_num_tokens: int, fraction: float = 0.9,
                            max_num_seqs: int = 0) -> int:
        """Bytes the KV cache may take: `fraction` of the device's memory, less the weights,
        the peak activations of a worst-case iteration (max_num_tokens prefill tokens, logits
        for one row per sequence of max_num_seqs; 0: LOGIT_ROWS) and room for the decode
        graphs. Call before init_cache."""
        if self.device.type != "cuda":
            return memory.host_kv_budget(fraction)
        c = self.config
        n = memory.worst_case_tokens(c, max_num_tokens)
        self.max_step_tokens = n
        self.max_sampled_rows = rows = memory.sampled_rows(n, max_num_seqs)
        bs = 16
        blocks = -(-n // bs)
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        caches = [torch.empty(blocks, 2, bs, c.num_kv_heads, c.head_dim, device=self.device,
                              dtype=self.dtype) for _ in range(c.num_layers)]
        cache_bytes = sum(t.numel() * t.element_size() for t in caches)
        meta = AttentionMetadata(
            query_start=torch.tensor([0, n], dtype=torch.int32, device=self.device),
            context_lens=torch.tensor([n], dtype=torch.int32, device=self.device),
            block_tables=torch.arange(blocks, dtype=torch.int32, device=self.device).unsqueeze(0),
            slot_mapping=torch.arange(n, dtype=torch.int64, device=self.device),
            block_size=bs, query_start_host=[0, n], context_lens_host=[n])
        ids = torch.randint(0, c.vocab_size, (n,), device=self.device)
        pos = torch.arange(n, device=self.device)
        self.backend.begin_iteration(meta)
        hidden = self.model(ids, pos, caches, meta)
        self.model.compute_logits(hidden[-rows:])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - cache_bytes  # weights + activations
        del caches, hidden
        torch.cuda.empty_cache()
        return memory.device_kv_budget(self.device, fraction, peak, self.graph_room_bytes(peak))

    def graph_room_bytes(self, peak: int) -> int:
        """Memory the CUDA graphs will hold, given one iteration's peak activations."""
        if not self.use_cuda_graphs:
            return 0
        hybrid = self.hybrid_graph_tokens > 0
        return memory.graph_room_bytes(self.config, self.graph_batch_sizes, hybrid, peak)

    # --- one iteration ----------------------------------------------------------------------
    def dispatch(self, plan: bytes) -> LaunchedStep:
        """launch() of a serialized BatchPlan (the executor interface)."""
        return self.launch(BatchPlan.from_proto(worker_pb2.BatchPlan.FromString(plan)))

    def collect(self, step: LaunchedStep) -> bytes:
        """finish(), serialized as a StepResult (the executor interface)."""
        return self.finish(step).to_proto().SerializeToString()

    def execute(self, plan: BatchPlan) -> StepOutput:
        """Runs one plan to completion: launch, then wait for its tokens."""
        return self.finish(self.launch(plan))

    @torch.inference_mode()
    def launch(self, plan: BatchPlan) -> LaunchedStep:
        """Checks the plan, prepares its inputs and queues its forward and sampling on the device
        without waiting for them. Tokens sampled by a step still in flight reach the next step's
        inputs on the device, so the host can prepare step i+1 while the GPU runs step i.
        Call launch and finish each in plan order (from one thread each, or alternately)."""
        t0 = time.perf_counter_ns()
        if not self.kv_caches:
            raise PlanError("Step before InitCache: allocate the KV cache first")
        check_plan(plan, self.num_blocks, self.config.vocab_size, self.config.max_model_len)
        if plan.swap_out_device_blocks or plan.swap_in_device_blocks:
            self._drain()   # swaps copy through host memory: let earlier steps land first
        try:
            apply_swaps(self.host_cache, self.kv_caches, plan)
        except SwapError as e:
            raise PlanError(str(e)) from e
        self._apply_membership(plan)
        batch = self._prepare(plan)
        t1 = time.perf_counter_ns()
        # FlashInfer's planning reuses one pinned staging buffer whose upload is queued in stream
        # order: before planning step i+1, step i's upload must be done, i.e. step i has begun.
        # This also keeps the host at most one step ahead of the device.
        if self._last_begin is not None:
            self._last_begin.synchronize()
        t_ready = time.perf_counter_ns()
        step = LaunchedStep(plan.step_id, launched_ns=t0)
        t2 = t_ready
        if batch is not None:
            batch = self.before_forward(plan, batch)
            logits = self._forward(batch, step)
            t2 = time.perf_counter_ns()
            if logits is not None:
                states = [self.seqs[s] for s in batch.sample_seqs]
                tokens = sample(logits, [s.sampling for s in states],
                                [len(s.token_ids) - s.num_prompt_tokens for s in states],
                                self.generator)
                for row, state in enumerate(states):
                    # A placeholder until finish() learns the value; the next step reads the
                    # token from the device through `pending`.
                    state.pending = PendingToken(tokens, row, len(state.token_ids))
                    step.indices.append(len(state.token_ids))
                    state.token_ids.append(-1)
                step.seq_ids, step.states = list(batch.sample_seqs), states
                step.tokens = self._to_host(tokens)
        if step.begin is None:  # nothing ran on the device: an empty span, still ordered
            step.begin = self._event()
        step.end = self._event()
        self._last_begin = step.begin
        t3 = time.perf_counter_ns()
        step.timings = StepTimings(queued_ns=t_ready - t1, prepare_ns=t1 - t0,
                                   forward_ns=t2 - t_ready, sample_ns=t3 - t2)
        return step

    def finish(self, step: LaunchedStep) -> StepOutput:
        """Waits for a launched step's tokens (only that step's: later ones keep running)."""
        tokens: list[int] = []
        if step.end is not None:
            step.end.synchronize()
        if step.tokens is not None:
            tokens = step.tokens.tolist()
            for state, index, token in zip(step.states, step.indices, tokens, strict=True):
                state.token_ids[index] = token
        t = step.timings
        if step.begin is not None and step.end is not None:
            t.device_ns = int(step.begin.elapsed_time(step.end) * 1e6)
            prev = self._last_end_event
            t.idle_ns = int(prev.elapsed_time(step.begin) * 1e6) if prev is not None else 0
            self._last_end_event = step.end
        else:  # CPU: the step ran inside launch(); idle is the host gap since the last one ended
            t.device_ns = t.prepare_ns + t.queued_ns + t.forward_ns + t.sample_ns
            end = step.launched_ns + t.device_ns
            t.idle_ns = step.launched_ns - self._last_end_ns if self._last_end_ns else 0
            self._last_end_ns = end
        return StepOutput(step.step_id, step.seq_ids, tokens, t)

    def _event(self) -> torch.cuda.Event | None:
        if self.device.type != "cuda":
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _to_host(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda":
            return tokens
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        return host

    def _drain(self) -> None:
        """Waits until every launched step has finished on the device."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _apply_membership(self, plan: BatchPlan) -> None:
        for seq_id in plan.dropped_seq_ids:
            self.seqs.pop(seq_id, None)
        for new in plan.new_sequences:
            if new.seq_id in self.seqs:
                raise PlanError(f"sequence {new.seq_id} registered twice")
            if not 0 < new.num_prompt_tokens <= len(new.token_ids):
                raise PlanError(f"sequence {new.seq_id}: {new.num_prompt_tokens} prompt tokens "
                                f"of {len(new.token_ids)}")
            # A prefix-cache hit arrives with its leading tokens' KV already in the block table.
            cached = new.num_computed_tokens
            if not 0 <= cached < len(new.token_ids) or cached > len(new.block_table) * self.block_size:
                raise PlanError(f"sequence {new.seq_id}: {cached} cached tokens of "
                                f"{len(new.token_ids)}, {len(new.block_table)} blocks")
            self.seqs[new.seq_id] = SequenceState(
                list(new.token_ids), new.num_prompt_tokens, list(new.block_table), cached,
                new.sampling)

    def before_forward(self, plan: BatchPlan, batch: HostBatch) -> HostBatch:
        """Hook for a subclass, called once per step with work, just before the model runs:
        returns the batch to run (a pipeline stage tags its handoff with the step, and samples
        only on the last stage). A whole model runs the batch as prepared."""
        return batch

    def _forward(self, batch: HostBatch, step: LaunchedStep) -> torch.Tensor | None:
        """Logits [len(sample_seqs), vocab] float32, through a CUDA graph where one fits.
        Marks step.begin once the inputs are in place, just before the model runs."""
        graphs = self.graphs
        if graphs is not None and batch.decode_only and len(batch.input_ids) <= graphs.max_batch:
            padded = graphs.load(batch.input_ids, batch.positions, batch.slots, batch.context_lens,
                                 batch.tables)
            self._fill_device_inputs(graphs.input_ids, batch)
            step.begin = self._event()
            return graphs.replay(padded, len(batch.input_ids))
        dev = self.device
        n = len(batch.input_ids)
        meta = AttentionMetadata.from_host(batch.query_start, batch.context_lens, batch.tables,
                                           batch.slots, self.block_size, dev)
        ids = upload(batch.input_ids, torch.int64, dev)
        self._fill_device_inputs(ids, batch)
        hybrid = self.hybrid_graphs
        if hybrid is not None and n <= hybrid.max_tokens:
            padded = hybrid.load(ids, batch.positions, batch.slots)
            self._plan_attention(meta, step)
            hidden = hybrid.run(padded, n, meta)
        else:
            pos = upload(batch.positions, torch.int64, dev)
            self._plan_attention(meta, step)
            hidden = self.model(ids, pos, self.kv_caches, meta)
        return self._logits(hidden, batch)

    def _logits(self, hidden: torch.Tensor, batch: HostBatch) -> torch.Tensor | None:
        """Logits of the rows that sample (None: no row does)."""
        if not batch.sample_seqs:
            return None
        if len(batch.sample_rows) < len(batch.input_ids):
            hidden = hidden[upload(batch.sample_rows, torch.int64, self.device)]
        return self.model.compute_logits(hidden)

    def _plan_attention(self, meta: AttentionMetadata, step: LaunchedStep) -> None:
        """Plans attention for the batch, then marks the step's start: the inputs are in place
        and the model's first kernel comes next."""
        self.backend.begin_iteration(meta)
        step.begin = self._event()

    def _fill_device_inputs(self, ids: torch.Tensor, batch: HostBatch) -> None:
        """Input tokens that earlier steps sampled and the host has not seen yet, copied on the
        device (stream order puts this after the step that sampled them)."""
        dev = ids.device
        for source, src_rows, dst_rows in batch.device_inputs:
            rows = upload([src_rows, dst_rows], torch.int64, dev)
            ids[rows[1]] = source[rows[0]]

    def _prepare(self, plan: BatchPlan) -> HostBatch | None:
        """Plan -> host lists for this iteration, after checking it against our state."""
        if not plan.seq_ids:
            return None
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        context_lens: list[int] = []
        tables: list[list[int]] = []
        on_device: dict[int, tuple[torch.Tensor, list[int], list[int]]] = {}
        offsets = [0]
        for count in plan.new_block_counts:
            offsets.append(offsets[-1] + count)
        # Rows of one-token sequences (decodes) first: attention then runs them as one
        # contiguous decode batch beside the prefill chunks. Sampled rows stay in plan order.
        counts = plan.num_scheduled_tokens
        order = [i for i, n in enumerate(counts) if n == 1] + [i for i, n in enumerate(counts) if n != 1]
        sampled: list[tuple[int, int, int]] = []   # (plan index, row, seq_id)
        for i in order:
            seq_id = plan.seq_ids[i]
            state = self.seqs.get(seq_id)
            if state is None:
                raise PlanError(f"step {plan.step_id}: unknown sequence {seq_id}")
            state.block_table.extend(plan.new_block_ids[offsets[i]:offsets[i + 1]])
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
            tokens = state.token_ids[start:end]
            pending = state.pending
            if pending is not None and start <= pending.index < end:
                group = on_device.setdefault(id(pending.tokens), (pending.tokens, [], []))
                group[1].append(pending.row)
                group[2].append(len(input_ids) + pending.index - start)
                tokens[pending.index - start] = 0   # overwritten on the device
            if -1 in tokens:
                raise PlanError(f"step {plan.step_id}: sequence {seq_id} schedules a token that "
                                f"is neither known nor the last one sampled")
            input_ids.extend(tokens)
            positions.extend(range(start, end))
            slots.extend(state.block_table[p // bs] * bs + p % bs for p in range(start, end))
            query_start.append(query_start[-1] + n)
            context_lens.append(end)
            tables.append(state.block_table)
            state.num_computed_tokens = end
            if end == len(state.token_ids):
                sampled.append((i, query_start[-1] - 1, seq_id))
        sampled.sort()
        sample_rows = [row for _, row, _ in sampled]
        sample_seqs = [seq_id for _, _, seq_id in sampled]
        return HostBatch(input_ids, positions, slots, query_start, context_lens, tables,
                         sample_rows, sample_seqs, list(on_device.values()))


def check_plan(plan: BatchPlan, num_blocks: int, vocab_size: int, max_model_len: int) -> None:
    """Bounds of every field a plan indexes with, before anything is applied: a block id outside
    the cache or a token outside the vocabulary would otherwise fail deep in a kernel (UNKNOWN),
    or write where it must not. Raises PlanError naming the field."""
    step = plan.step_id
    n = len(plan.seq_ids)
    for name in ("num_computed_tokens", "num_scheduled_tokens", "new_block_counts"):
        if len(getattr(plan, name)) != n:
            raise PlanError(f"step {step}: {name} has {len(getattr(plan, name))} entries for {n} seq_ids")
    if len(set(plan.seq_ids)) != n:
        raise PlanError(f"step {step}: seq_ids: a sequence is scheduled twice")
    if sum(plan.new_block_counts) != len(plan.new_block_ids):
        raise PlanError(f"step {step}: new_block_counts add up to {sum(plan.new_block_counts)} but "
                        f"new_block_ids has {len(plan.new_block_ids)}")
    if plan.new_block_ids and max(plan.new_block_ids) >= num_blocks:
        raise PlanError(f"step {step}: new_block_ids: block {max(plan.new_block_ids)} is outside the "
                        f"cache of {num_blocks} blocks")
    if any(t > max_model_len for t in plan.num_scheduled_tokens):
        raise PlanError(f"step {step}: num_scheduled_tokens: more than the context of {max_model_len}")
    for new in plan.new_sequences:
        where = f"step {step}: new_sequences (sequence {new.seq_id})"
        if len(new.token_ids) > max_model_len:
            raise PlanError(f"{where}: token_ids: {len(new.token_ids)} tokens, more than the context "
                            f"of {max_model_len}")
        if new.token_ids and max(new.token_ids) >= vocab_size:
            raise PlanError(f"{where}: token_ids: token {max(new.token_ids)} is outside the vocabulary "
                            f"of {vocab_size}")
        if new.block_table and max(new.block_table) >= num_blocks:
            raise PlanError(f"{where}: block_table: block {max(new.block_table)} is outside the cache "
                            f"of {num_blocks} blocks")
        o = new.sampling
        if not (math.isfinite(o.temperature) and o.temperature >= 0
                and math.isfinite(o.top_p) and 0 <= o.top_p <= 1):
            raise PlanError(f"{where}: sampling: temperature {o.temperature}, top_p {o.top_p} out of range")

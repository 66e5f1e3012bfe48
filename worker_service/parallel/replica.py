"""One rank of a replica: build its shard of the model, then either drive the replica (rank 0,
behind the gRPC Worker service) or follow rank 0's control messages (every other rank).

Per iteration (one plan):
  rank 0      gets the plan bytes over gRPC, forwards them as they are (plus the tokens the last
              stage sampled since the previous plan) to every other rank, runs its own part
  stage s     runs its layers; TP ranks meet in all_reduce / all_gather (NCCL, gloo on the CPU);
              each rank hands (hidden, residual) to its counterpart in stage s + 1
  last stage  samples; its TP rank 0 sends the StepResult bytes to rank 0, which returns them
"""

from __future__ import annotations

import gc
import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from protos import worker_pb2
from protos.batch_plan import BatchPlan, StepOutput
from worker_service import memory
from worker_service.executor import ExecutorBroken, PlanError
from worker_service.models.config import ModelConfig
from worker_service.models.llama import LlamaModel
from worker_service.parallel.curve import PLAINTEXT, LinkSecurity
from worker_service.parallel.handoff import (
    ERROR,
    INIT,
    MEMORY_REPLY,
    MEMORY_REQUEST,
    PLAN,
    RESET,
    RESULT,
    STATS,
    STATS_REPLY,
    STATS_REQUEST,
    STOP,
    Mailbox,
    Outbox,
)
from worker_service.parallel.layout import ReplicaLayout, split_layers
from worker_service.parallel.pipeline import StageRunner, slice_stage
from worker_service.parallel.tensor_parallel import COMM, head_shard, shard_model, shard_weight

COLLECTIVE_TIMEOUT = timedelta(seconds=600)   # a dead peer is caught by heartbeats much sooner


@dataclass
class Rank:
    """Everything one process of a replica holds."""

    layout: ReplicaLayout
    rank: int
    runner: StageRunner
    full_config: ModelConfig       # the whole model's shape (what Describe reports)
    mailbox: Mailbox
    outbox: Outbox


class RankPart:
    """What one rank keeps of the whole model: its stage's layers (renumbered from 0), the
    embedding on the first stage and the final norm and LM head on the last, each cut to the
    rank's tensor-parallel shard (loader.ModelPart)."""

    def __init__(self, layout: ReplicaLayout, rank: int, group: dist.ProcessGroup | None,
                 outbox: Outbox) -> None:
        self.layout, self.group, self.outbox = layout, group, outbox
        self.stage, self.tp_rank = layout.stage_of(rank), layout.tp_rank_of(rank)
        self.full_config: ModelConfig | None = None
        self.layers = range(0)

    def shape(self, model: LlamaModel) -> torch.nn.Module:
        self.full_config = model.config
        self.layers = split_layers(model.config.num_layers, self.layout.pp_size)[self.stage]
        part = slice_stage(model, self.stage, self.layout.pp_size, self.outbox)
        return shard_model(part, self.tp_rank, self.layout.tp_size, self.group)

    def keep(self, name: str, whole: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        assert self.full_config is not None, "shape() comes first"
        first, last = self.stage == 0, self.stage == self.layout.pp_size - 1
        if name.startswith("layers."):
            _, index, rest = name.split(".", 2)
            if int(index) not in self.layers:
                return []
            names = [f"layers.{int(index) - self.layers.start}.{rest}"]
        elif name == "embed_tokens.weight":  # also the LM head where the two are tied
            names = (["embed_tokens.weight"] if first else []) + \
                (["lm_head.weight"] if last and self.full_config.tie_word_embeddings else [])
        elif name in ("norm.weight", "lm_head.weight"):
            names = [name] if last else []
        else:
            names = [name]
        if not names:
            return []
        piece = shard_weight(name, whole, self.full_config, self.tp_rank, self.layout.tp_size)
        return [(n, piece) for n in names]


def rank_device(device: torch.device, layout: ReplicaLayout, rank: int) -> torch.device:
    """A CUDA device with no index means one GPU per rank: the rank's place among the ranks of
    its host (by the host part of their addresses). An explicit index is taken as given."""
    if device.type != "cuda" or device.index is not None:
        return device
    local, count = layout.local_rank(rank), torch.cuda.device_count()
    if local >= count:
        raise RuntimeError(f"rank {rank} is rank {local + 1} on its host, which has {count} GPUs: "
                           "a replica takes one GPU per rank; use fewer ranks per host")
    return torch.device("cuda", local)


def build_rank(layout: ReplicaLayout, rank: int, load: Callable[..., torch.nn.Module],
               device: torch.device, dtype: torch.dtype, cuda_graphs: bool = True,
               security: LinkSecurity = PLAINTEXT) -> Rank:
    """`load(device, part)` builds the model part (loader.load_model with a ModelPart); this
    rank's part is its stage, then its TP shard of that stage, and only that is ever read into
    memory. All ranks must call this together: it joins the collective group (NCCL between GPUs,
    gloo on the CPU). cuda_graphs: see StageRunner. security: CURVE and the bind address of the
    rank's ZeroMQ links."""
    device = rank_device(device, layout, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL and Triton launch on the current device
    mailbox = Mailbox(layout, rank, security)
    outbox = Outbox(layout, rank, mailbox)
    group = None
    if layout.tp_size > 1:
        host, port = layout.dist_init.rsplit(":", 1)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                init_method=f"tcp://{host}:{port}", rank=rank,
                                world_size=layout.world_size, timeout=COLLECTIVE_TIMEOUT,
                                device_id=device if device.type == "cuda" else None)
        # Every rank creates every stage's group, in the same order (a torch.distributed rule).
        groups = [dist.new_group(layout.stage_ranks(s)) for s in range(layout.pp_size)]
        group = groups[layout.stage_of(rank)]
    part = RankPart(layout, rank, group, outbox)
    model = load(device, part)
    assert part.full_config is not None
    runner = StageRunner(model, device, dtype, samples=layout.stage_of(rank) == layout.pp_size - 1,
                         cuda_graphs=cuda_graphs)
    return Rank(layout, rank, runner, part.full_config, mailbox, outbox)


def rank_bytes_per_block(layout: ReplicaLayout, config: ModelConfig, rank: int, block_size: int,
                         dtype: torch.dtype) -> int:
    """KV bytes one block takes on `rank` (any rank: rank 0 knows them all from the layout): its
    stage's layers, its share of the KV heads."""
    layers = len(split_layers(config.num_layers, layout.pp_size)[layout.stage_of(rank)])
    kv_heads = head_shard(config.num_heads, config.num_kv_heads, layout.tp_rank_of(rank),
                          layout.tp_size).num_kv_heads if layout.tp_size > 1 else config.num_kv_heads
    return memory.kv_block_bytes(layers, kv_heads, config.head_dim, block_size, dtype)


# --- ranks other than 0 -------------------------------------------------------------------
def follow(r: Rank) -> None:
    """Executes rank 0's control messages until told to stop."""
    runner, leader = r.runner, r.rank == r.layout.last_stage_leader
    while True:
        kind, *frames = r.mailbox.control.get()
        if kind == STOP:
            return
        if kind == RESET:
            runner.reset()
        elif kind == INIT:
            runner.init_cache(int(frames[0]), int(frames[1]))
        elif kind == STATS_REQUEST:
            r.outbox.send(0, STATS_REPLY, json.dumps(dict(comm_stats(), rank=r.rank)).encode())
            reset_comm_stats()
        elif kind == MEMORY_REQUEST:
            ask = json.loads(frames[0])
            budget = runner.profile_free_memory(ask["tokens"], ask["fraction"], ask["seqs"])
            r.outbox.send(0, MEMORY_REPLY, json.dumps(dict(bytes=budget, rank=r.rank)).encode())
        elif kind == PLAN:
            for result in frames[1:]:
                runner.apply_sampled(StepOutput.from_proto(worker_pb2.StepResult.FromString(result)))
            plan = BatchPlan.from_proto(worker_pb2.BatchPlan.FromString(frames[0]))
            try:
                out = runner.execute(plan)
            except PlanError as e:
                # Every rank holds the same state and checks before any collective, so all fail
                # here together; rank 0 reports its own copy of the error.
                if leader:
                    r.outbox.send(0, ERROR, str(plan.step_id).encode(), str(e).encode())
                continue
            if leader:
                r.outbox.send(0, RESULT, out.to_proto().SerializeToString())


# --- rank 0 ---------------------------------------------------------------------------------
@dataclass
class _Flight:
    step_id: int
    seq_ids: set[int]


@contextmanager
def _breaks_replica() -> Iterator[None]:
    """Any failure but a PlanError means a collective or handoff broke: the ranks are out of
    step, and nothing this replica computes can be trusted again."""
    try:
        yield
    except PlanError:
        raise
    except Exception as e:
        raise ExecutorBroken(f"replica failed: {e!r}") from e


class ReplicaDriver:
    """Rank 0: the executor (executor.py) the gRPC Worker service drives for a whole replica.
    dispatch() sends a plan's bytes into the replica and runs rank 0's own part; collect() waits
    for its sampled tokens, so that a pipeline can hold several micro-batches. Up to pp_size
    plans are in flight at once, as long as no sequence is in two of them (its next chunk needs
    the token or KV entries of the previous one); a plan that would break this waits in
    dispatch() until the earlier micro-batch is collected. Call dispatch from one thread and
    collect from one (possibly other) thread, each in plan order."""

    def __init__(self, r: Rank) -> None:
        self.r = r
        self.layout = r.layout
        self.config = r.full_config
        self.runner = r.runner
        self.device, self.dtype = r.runner.device, r.runner.dtype
        self.depth = self.layout.pp_size
        self.max_in_flight = 0              # the most micro-batches ever in flight (tests, traces)
        self._cond = threading.Condition()
        self._in_flight: deque[_Flight] = deque()        # guarded by _cond
        self._sampled: list[bytes] = []    # results not yet forwarded to the earlier stages
        self._local: dict[int, bytes] = {}  # pp_size 1: rank 0 sampled the tokens itself

    def bytes_per_block(self, block_size: int) -> int:
        """The largest per-rank need: the scheduler's block count must fit on every rank."""
        return max(rank_bytes_per_block(self.layout, self.config, k, block_size, self.dtype)
                   for k in range(self.layout.world_size))

    def init_cache(self, num_blocks: int, block_size: int, num_host_blocks: int = 0) -> int:
        if num_host_blocks:
            raise ValueError("swapping to host memory is not supported by parallel replicas yet: "
                             "drop --num-host-kv-blocks")
        self.r.outbox.broadcast(INIT, str(num_blocks).encode(), str(block_size).encode())
        self.runner.init_cache(num_blocks, block_size)
        return num_blocks * sum(rank_bytes_per_block(self.layout, self.config, k, block_size, self.dtype)
                                for k in range(self.layout.world_size))

    def reset(self) -> None:
        """A new scheduler stream: every rank forgets its sequences."""
        self.r.outbox.broadcast(RESET)
        self.runner.reset()
        with self._cond:
            self._sampled.clear()
            self._in_flight.clear()
            self._local.clear()
            self._cond.notify_all()
        while not self.r.mailbox.results.empty():   # leftovers of a broken stream
            self.r.mailbox.results.get()

    def stop(self) -> None:
        """Tells every rank to exit, and stops watching them go."""
        self.r.outbox.broadcast(STOP)
        self.r.mailbox.close()

    def execute(self, plan_bytes: bytes) -> bytes:
        """Plan bytes in, StepResult bytes out (one micro-batch at a time)."""
        return self.collect(self.dispatch(plan_bytes))

    def dispatch(self, plan_bytes: bytes) -> int:
        """Sends the plan to every rank and runs rank 0's part of it; returns its step id."""
        with _breaks_replica():
            return self._dispatch(plan_bytes)

    def collect(self, step_id: int) -> bytes:
        """The StepResult bytes of a dispatched plan (the oldest one not yet collected)."""
        with _breaks_replica():
            return self._collect(step_id)

    def _dispatch(self, plan_bytes: bytes) -> int:
        msg = worker_pb2.BatchPlan.FromString(plan_bytes)
        touched = set(msg.seq_ids) | set(msg.dropped_seq_ids)
        with self._cond:
            self._cond.wait_for(lambda: len(self._in_flight) < self.depth and
                                not any(f.seq_ids & touched for f in self._in_flight))
            sampled, self._sampled = self._sampled, []
            self._in_flight.append(_Flight(msg.step_id, set(msg.seq_ids)))
            self.max_in_flight = max(self.max_in_flight, len(self._in_flight))
        self.r.outbox.broadcast(PLAN, plan_bytes, *sampled)
        for result in sampled:   # rank 0's stage learns them when the others do
            self.runner.apply_sampled(StepOutput.from_proto(worker_pb2.StepResult.FromString(result)))
        out = self.runner.execute(BatchPlan.from_proto(msg))
        if self.layout.pp_size == 1:
            self._local[msg.step_id] = out.to_proto().SerializeToString()
        return msg.step_id

    def _collect(self, step_id: int) -> bytes:
        result = self._local.pop(step_id) if self.layout.pp_size == 1 else self._wait_result(step_id)
        with self._cond:
            flight = self._in_flight.popleft()
            assert flight.step_id == step_id, f"collected step {step_id}, oldest is {flight.step_id}"
            if self.layout.pp_size > 1:
                self._sampled.append(result)
            self._cond.notify_all()
        return result

    def _ask_all(self, request: bytes, reply: bytes, own: dict, *payload: bytes) -> list[dict]:
        """Every rank's JSON answer to `request` (rank 0's is `own`), in rank order."""
        self.r.outbox.broadcast(request, *payload)
        answers = {0: own}
        while len(answers) < self.layout.world_size:
            kind, *frames = self.r.mailbox.results.get()
            if kind == reply:
                answer = json.loads(frames[0])
                answers[answer.pop("rank")] = answer
        return [answers[k] for k in range(self.layout.world_size)]

    def gather_stats(self) -> list[dict[str, int]]:
        """Every rank's traffic counters since the last call, in rank order; resets them."""
        own = comm_stats()
        reset_comm_stats()
        return self._ask_all(STATS_REQUEST, STATS_REPLY, own)

    def profile_free_memory(self, max_num_tokens: int, fraction: float = 0.9,
                            max_num_seqs: int = 0) -> int:
        """KV bytes for the worker's Describe: every rank reports its own budget."""
        ask = json.dumps(dict(tokens=max_num_tokens, fraction=fraction, seqs=max_num_seqs)).encode()
        own = dict(bytes=self.runner.profile_free_memory(max_num_tokens, fraction, max_num_seqs))
        budgets = [b["bytes"] for b in self._ask_all(MEMORY_REQUEST, MEMORY_REPLY, own, ask)]
        per_token = [rank_bytes_per_block(self.layout, self.config, k, 1, self.dtype)
                     for k in range(self.layout.world_size)]
        return memory.replica_kv_budget(budgets, per_token)

    def _wait_result(self, step_id: int) -> bytes:
        start = time.perf_counter_ns()
        while True:
            kind, *frames = self.r.mailbox.results.get()
            if kind == ERROR:
                if int(frames[0]) == step_id:
                    raise PlanError(frames[1].decode())
                continue
            assert kind == RESULT
            if worker_pb2.StepResult.FromString(frames[0]).step_id == step_id:
                STATS.wait_ns += time.perf_counter_ns() - start
                return frames[0]


def close_rank(r: Rank) -> None:
    """Leaves the replica in order (tests and benchmarks build several in one process). The
    rank's CUDA graphs go first: a graph that captured NCCL collectives holds a reference on the
    communicator, and NCCL's teardown waits until no graph refers to it (forever, otherwise)."""
    r.mailbox.close()
    r.runner.graphs = r.runner.hybrid_graphs = None
    gc.collect()
    if dist.is_initialized():
        if r.runner.device.type == "cuda":
            torch.cuda.synchronize(r.runner.device)
        dist.destroy_process_group()


def comm_stats() -> dict[str, int]:
    return dict(zmq_messages=STATS.messages, zmq_bytes=STATS.bytes, zmq_send_ns=STATS.send_ns,
                zmq_wait_ns=STATS.wait_ns, hidden_transit_ns=STATS.transit_ns,
                hidden_unpack_ns=STATS.unpack_ns, collective_calls=COMM.calls, collective_bytes=COMM.bytes,
                collective_ns=COMM.ns)


def reset_comm_stats() -> None:
    STATS.reset()
    COMM.calls = COMM.bytes = COMM.ns = 0

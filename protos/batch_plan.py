"""The batch plan and step result as plain dataclasses, and their protobuf encoding.

Both services speak these types; the protobuf messages appear only at the gRPC edges
(`to_proto` / `from_proto`). Field meanings are documented in worker.proto.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from protos import worker_pb2


@dataclass(frozen=True)
class SamplingOptions:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class NewSequence:
    seq_id: int
    token_ids: list[int]
    block_table: list[int]
    sampling: SamplingOptions
    num_prompt_tokens: int
    num_computed_tokens: int = 0   # a prefix-cache hit: these tokens' KV is already in the table


@dataclass
class BatchPlan:
    step_id: int
    dropped_seq_ids: list[int] = field(default_factory=list)
    new_sequences: list[NewSequence] = field(default_factory=list)
    seq_ids: list[int] = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)
    num_scheduled_tokens: list[int] = field(default_factory=list)
    new_block_counts: list[int] = field(default_factory=list)
    new_block_ids: list[int] = field(default_factory=list)
    # KV copies, applied before anything else in the plan (swap-out first): pair i copies
    # swap_out_device_blocks[i] -> swap_out_host_blocks[i], swap_in_host_blocks[i] ->
    # swap_in_device_blocks[i].
    swap_out_device_blocks: list[int] = field(default_factory=list)
    swap_out_host_blocks: list[int] = field(default_factory=list)
    swap_in_host_blocks: list[int] = field(default_factory=list)
    swap_in_device_blocks: list[int] = field(default_factory=list)

    def schedule(self, seq_id: int, num_computed: int, num_scheduled: int,
                 new_blocks: list[int]) -> None:
        self.seq_ids.append(seq_id)
        self.num_computed_tokens.append(num_computed)
        self.num_scheduled_tokens.append(num_scheduled)
        self.new_block_counts.append(len(new_blocks))
        self.new_block_ids.extend(new_blocks)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_scheduled_tokens)

    @property
    def is_empty(self) -> bool:
        return (not self.seq_ids and not self.dropped_seq_ids and not self.swap_out_device_blocks
                and not self.swap_in_device_blocks)

    def to_proto(self) -> worker_pb2.BatchPlan:
        return worker_pb2.BatchPlan(
            step_id=self.step_id,
            dropped_seq_ids=self.dropped_seq_ids,
            new_sequences=[
                worker_pb2.NewSequence(
                    seq_id=s.seq_id, token_ids=s.token_ids, block_table=s.block_table,
                    sampling=worker_pb2.SamplingOptions(
                        temperature=s.sampling.temperature, top_p=s.sampling.top_p,
                        top_k=s.sampling.top_k, seed=s.sampling.seed),
                    num_prompt_tokens=s.num_prompt_tokens,
                    num_computed_tokens=s.num_computed_tokens,
                )
                for s in self.new_sequences
            ],
            seq_ids=self.seq_ids,
            num_computed_tokens=self.num_computed_tokens,
            num_scheduled_tokens=self.num_scheduled_tokens,
            new_block_counts=self.new_block_counts,
            new_block_ids=self.new_block_ids,
            swap_out_device_blocks=self.swap_out_device_blocks,
            swap_out_host_blocks=self.swap_out_host_blocks,
            swap_in_host_blocks=self.swap_in_host_blocks,
            swap_in_device_blocks=self.swap_in_device_blocks,
        )

    @classmethod
    def from_proto(cls, msg: worker_pb2.BatchPlan) -> BatchPlan:
        return cls(
            step_id=msg.step_id,
            dropped_seq_ids=list(msg.dropped_seq_ids),
            new_sequences=[
                NewSequence(
                    seq_id=s.seq_id, token_ids=list(s.token_ids), block_table=list(s.block_table),
                    sampling=SamplingOptions(
                        temperature=s.sampling.temperature, top_p=s.sampling.top_p,
                        top_k=s.sampling.top_k,
                        seed=s.sampling.seed if s.sampling.HasField("seed") else None),
                    num_prompt_tokens=s.num_prompt_tokens,
                    num_computed_tokens=s.num_computed_tokens,
                )
                for s in msg.new_sequences
            ],
            seq_ids=list(msg.seq_ids),
            num_computed_tokens=list(msg.num_computed_tokens),
            num_scheduled_tokens=list(msg.num_scheduled_tokens),
            new_block_counts=list(msg.new_block_counts),
            new_block_ids=list(msg.new_block_ids),
            swap_out_device_blocks=list(msg.swap_out_device_blocks),
            swap_out_host_blocks=list(msg.swap_out_host_blocks),
            swap_in_host_blocks=list(msg.swap_in_host_blocks),
            swap_in_device_blocks=list(msg.swap_in_device_blocks),
        )


@dataclass
class StepTimings:
    queued_ns: int = 0
    prepare_ns: int = 0
    forward_ns: int = 0
    sample_ns: int = 0
    idle_ns: int = 0
    device_ns: int = 0


@dataclass
class StepOutput:
    step_id: int
    seq_ids: list[int]
    token_ids: list[int]
    timings: StepTimings = field(default_factory=StepTimings)
    draining: bool = False        # the worker is shutting down (see worker.proto)

    def to_proto(self) -> worker_pb2.StepResult:
        t = self.timings
        return worker_pb2.StepResult(
            step_id=self.step_id, seq_ids=self.seq_ids, token_ids=self.token_ids, draining=self.draining,
            timings=worker_pb2.StepTimings(queued_ns=t.queued_ns, prepare_ns=t.prepare_ns,
                                           forward_ns=t.forward_ns, sample_ns=t.sample_ns,
                                           idle_ns=t.idle_ns, device_ns=t.device_ns))

    @classmethod
    def from_proto(cls, msg: worker_pb2.StepResult) -> StepOutput:
        t = msg.timings
        return cls(step_id=msg.step_id, seq_ids=list(msg.seq_ids), token_ids=list(msg.token_ids),
                   timings=StepTimings(t.queued_ns, t.prepare_ns, t.forward_ns, t.sample_ns, t.idle_ns,
                                       t.device_ns), draining=msg.draining)

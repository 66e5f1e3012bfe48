"""The replica layout: which process is which tensor-parallel rank of which pipeline stage.

Ranks are numbered stage-major: rank = stage * tp_size + tp_rank. Rank 0 (stage 0, TP rank 0)
is the replica's face to the scheduler (the gRPC Worker service); the last stage's TP rank 0
returns the sampled tokens to it. Every rank is named by the address its ZeroMQ mailbox binds,
so the same layout works on one host or many: nothing assumes localhost.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReplicaLayout:
    tp_size: int
    pp_size: int
    addresses: tuple[str, ...]     # "host:port" of each rank's mailbox, in rank order
    dist_init: str                 # "host:port" of torch.distributed's TCP store (hosted by rank 0)

    def __post_init__(self) -> None:
        if self.tp_size < 1 or self.pp_size < 1:
            raise ValueError("tensor- and pipeline-parallel sizes must be >= 1")
        if len(self.addresses) != self.world_size:
            raise ValueError(f"a replica of TP={self.tp_size} x PP={self.pp_size} needs "
                             f"{self.world_size} addresses, got {len(self.addresses)}")

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    def stage_of(self, rank: int) -> int:
        return rank // self.tp_size

    def tp_rank_of(self, rank: int) -> int:
        return rank % self.tp_size

    def rank_of(self, stage: int, tp_rank: int) -> int:
        return stage * self.tp_size + tp_rank

    @property
    def last_stage_leader(self) -> int:
        """The rank that reports sampled tokens (every last-stage TP rank samples the same)."""
        return self.rank_of(self.pp_size - 1, 0)

    def stage_ranks(self, stage: int) -> list[int]:
        return [self.rank_of(stage, t) for t in range(self.tp_size)]

    def local_rank(self, rank: int) -> int:
        """The rank's place among the ranks on its host (by the host part of the addresses)."""
        host = self.addresses[rank].rsplit(":", 1)[0]
        return sum(1 for a in self.addresses[:rank] if a.rsplit(":", 1)[0] == host)

    def endpoint(self, rank: int) -> str:
        return f"tcp://{self.addresses[rank]}"

    @staticmethod
    def parse(tp_size: int, pp_size: int, addresses: str, dist_init: str) -> ReplicaLayout:
        return ReplicaLayout(tp_size, pp_size, tuple(a.strip() for a in addresses.split(",") if a.strip()),
                             dist_init)


def split_layers(num_layers: int, pp_size: int) -> list[range]:
    """Contiguous layer ranges per stage, as even as possible (earlier stages take the extra
    layers: the last stage also runs the LM head, so it gets the lighter share)."""
    if num_layers < pp_size:
        raise ValueError(f"{num_layers} layers cannot fill {pp_size} pipeline stages")
    base, extra = divmod(num_layers, pp_size)
    ranges, start = [], 0
    for stage in range(pp_size):
        n = base + (1 if stage < extra else 0)
        ranges.append(range(start, start + n))
        start += n
    return ranges

"""What the Worker service runs plans on: one interface, two implementations. The single-process
ModelRunner (runner.py) holds the whole model; a parallel replica's ReplicaDriver
(parallel/replica.py) runs rank 0's part and drives the other ranks.

Plans come in and results go out as protobuf bytes: a replica forwards each plan's bytes to its
other ranks exactly as they arrived, so the service never decodes them; each executor does, once.
"""

from __future__ import annotations

from typing import Protocol, TypeVar

import torch

from worker_service.models.config import ModelConfig


class PlanError(ValueError):
    """The plan contradicts the executor's state: a scheduler bug or a lost message. The
    executor stays usable (the next scheduler's stream resets it)."""


class ExecutorBroken(RuntimeError):
    """The executor can no longer be trusted (a replica whose ranks fell out of step): the worker
    cannot serve any stream again, and its process ends."""


Handle = TypeVar("Handle")


class Executor(Protocol[Handle]):
    """Call dispatch from one thread and collect from one (possibly other) thread, each in plan
    order: plan i + 1 may be dispatched before plan i is collected."""

    config: ModelConfig      # the whole model's shape (what Describe reports)
    device: torch.device     # where the model (rank 0's part of it) runs
    dtype: torch.dtype
    depth: int               # micro-batches of disjoint sequences it runs at once: a pipeline's stages

    def bytes_per_block(self, block_size: int) -> int:
        """KV bytes of one block, where a block costs most (the scheduler's count must fit)."""
        ...

    def profile_free_memory(self, max_num_tokens: int, fraction: float = 0.9,
                            max_num_seqs: int = 0) -> int:
        """KV bytes the cache may take once iterations of max_num_tokens (of up to max_num_seqs
        sequences, each sampling a row; 0: not said) have room, measured by a trial forward where
        one process holds the model, else estimated. Before init_cache."""
        ...

    def init_cache(self, num_blocks: int, block_size: int, num_host_blocks: int = 0) -> int:
        """Allocates the KV cache (and a host cache for swapping); returns its bytes."""
        ...

    def reset(self) -> None:
        """A new scheduler: forget every sequence and any step still in flight."""
        ...

    def dispatch(self, plan: bytes) -> Handle:
        """Starts one serialized BatchPlan; raises PlanError if it contradicts the state."""
        ...

    def collect(self, handle: Handle) -> bytes:
        """Waits for a dispatched plan's serialized StepResult."""
        ...

    def stop(self) -> None:
        """The worker is shutting down."""
        ...

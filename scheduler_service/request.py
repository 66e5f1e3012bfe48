"""A request's state on the scheduler side, and its life cycle."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

from protos.batch_plan import SamplingOptions


class RequestStatus(Enum):
    WAITING = "waiting"        # queued, or preempted and queued again (its KV is gone)
    RUNNING = "running"        # holds KV blocks; prefilling or decoding
    FINISHED = "finished"


class FinishReason(Enum):
    STOP = "stop"              # EOS or a stop token id (stop strings end in the frontend)
    LENGTH = "length"          # max_tokens or the context length
    ABORT = "abort"            # cancelled by the client or the server


@dataclass
class Request:
    """Counters follow one vocabulary: a request has num_tokens known (prompt + output), of which
    num_computed_tokens are in the KV cache. Every step schedules some of the rest."""

    seq_id: int
    prompt_token_ids: list[int]
    sampling: SamplingOptions
    max_tokens: int                       # already capped by the context length
    stop_token_ids: frozenset[int] = frozenset()
    priority: int = 0                     # higher runs first (policies that support it)
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    known_to_worker: bool = False         # the worker holds its tokens and block table
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    # Prefix-cache keys of this request's full blocks, filled in lazily by the block manager
    # (tokens are only appended, so the keys computed so far stay valid).
    block_hashes: list[bytes] = field(default_factory=list, repr=False)
    # Overlapped scheduling: tokens the worker has sampled (or will sample in a plan already
    # sent) whose values have not arrived yet. They count as known tokens, so the next plan can
    # schedule their decode before the value is back: the worker feeds its own sample forward.
    num_pending_tokens: int = 0
    # Step results older than this plan belong to an earlier life of the sequence (before a
    # preemption) and are void.
    registered_step: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_decoding(self) -> bool:
        """Prefill done: only the last sampled token is left to compute."""
        return self.num_computed_tokens > 0 and self.num_uncomputed_tokens == 1

    @property
    def can_generate_more(self) -> bool:
        """False once the tokens already sampled reach max_tokens: scheduling another decode
        would only make a token to throw away."""
        return len(self.output_token_ids) + self.num_pending_tokens < self.max_tokens

    @property
    def max_num_tokens(self) -> int:
        """The most KV slots this request can ever need."""
        return self.num_prompt_tokens + self.max_tokens

    def check_stop(self) -> FinishReason | None:
        """After a token was appended: should the request end?"""
        last = self.output_token_ids[-1]
        if last in self.stop_token_ids:
            return FinishReason.STOP
        if len(self.output_token_ids) >= self.max_tokens:
            return FinishReason.LENGTH
        return None

"""What the load client observed for one request, and the latencies derived from it.

All times are seconds on the client's monotonic clock, relative to the start of the run, so a
record can be checked by hand: TTFT is measured from the request's *scheduled* arrival (what a
user would see, including any lateness of the client itself), and every later gap is one TBT.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestRecord:
    index: int
    num_prompt_tokens: int
    num_output_tokens: int  # requested (max_tokens with ignore_eos)
    arrival_s: float  # scheduled arrival
    sent_s: float | None = None  # when the client actually issued the call
    # One entry per TokenChunk message: when it arrived and how many tokens it carried.
    chunk_times_s: list[float] = field(default_factory=list)
    chunk_num_tokens: list[int] = field(default_factory=list)
    finished_s: float | None = None  # when the Finished message arrived
    finish_reason: str | None = None
    num_completion_tokens: int | None = None  # from Finished.usage
    error: str | None = None  # gRPC status or "early stop"; None for a request that completed
    # Arrival at the scheduler to first scheduling, when the server reports it.
    scheduling_delay_s: float | None = None

    @property
    def completed(self) -> bool:
        return self.error is None and self.finished_s is not None

    @property
    def num_received_tokens(self) -> int:
        return sum(self.chunk_num_tokens)

    @property
    def ttft_s(self) -> float | None:
        return self.chunk_times_s[0] - self.arrival_s if self.chunk_times_s else None

    @property
    def tbt_gaps_s(self) -> list[float]:
        """Gaps between consecutive token messages. A message that carries several tokens (the
        server caught up) counts as one gap: the user waited that long for all of them."""
        times = self.chunk_times_s
        return [later - earlier for earlier, later in zip(times, times[1:], strict=False)]

    @property
    def e2e_s(self) -> float | None:
        if not self.completed or self.finished_s is None:
            return None
        return self.finished_s - self.arrival_s

    @property
    def normalized_latency_s(self) -> float | None:
        """End-to-end latency per generated token (s/token), the paper's normalized latency."""
        e2e = self.e2e_s
        tokens = self.num_completion_tokens or self.num_received_tokens
        return None if e2e is None or tokens == 0 else e2e / tokens

    @property
    def send_lag_s(self) -> float | None:
        """How late the client issued the call: large values mean the client, not the server,
        was the bottleneck and the latencies are not to be trusted."""
        return None if self.sent_s is None else self.sent_s - self.arrival_s

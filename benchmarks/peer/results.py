"""What a peer run found per system, filled in as the run goes: a system stopped at its time
limit keeps what it had measured by then."""

from __future__ import annotations

from dataclasses import dataclass, field

from benchmarks.serving.capacity import Probe
from benchmarks.serving.metrics import RunSummary


@dataclass(frozen=True)
class OfflineResult:
    """All requests sent at once; output tok/s = output tokens received / (last finish - start)."""

    num_requests: int
    prompt_tokens: int
    output_tokens: int
    num_failed: int
    duration_s: float
    output_tokens_per_s: float

    @staticmethod
    def from_summary(summary: RunSummary, prompt_tokens: int, output_tokens: int) -> OfflineResult:
        return OfflineResult(
            summary.num_requests,
            prompt_tokens,
            output_tokens,
            summary.num_failed,
            summary.duration_s,
            summary.output_token_throughput,
        )


@dataclass
class SystemResult:
    label: str
    engine: str  # "vllm" or "ours"
    budget: int | None
    probes: list[Probe] = field(default_factory=list)  # in the order they ran
    capacity_rate: float | None = None  # None: the search did not run or did not finish
    offline: OfflineResult | None = None
    startup_s: float | None = None
    error: str | None = None  # why the system is incomplete (time limit, a failed start)

    def settle_capacity(self) -> None:
        """After a cut-short search: the best passing rate probed so far (what the search would
        have reported had it stopped there)."""
        if self.capacity_rate is None and self.probes:
            self.capacity_rate = max((p.rate for p in self.probes if p.passed), default=0.0)

    @property
    def at_capacity(self) -> Probe | None:
        passing = [p for p in self.probes if p.passed and p.rate == self.capacity_rate]
        return passing[-1] if passing else None


@dataclass
class SloAnchor:
    """The strict SLO's unit: vLLM's decode step at batch 32, context 4096 on this GPU, given
    (--slo-p99-tbt-ms) or measured by the first vLLM system of the run."""

    multiple: float  # P99 TBT bound = multiple x decode step
    decode_step_s: float | None = None
    measured_by: str | None = None  # the system that measured it; None when given
    given_p99_tbt_s: float | None = None

    @property
    def p99_tbt_s(self) -> float | None:
        if self.given_p99_tbt_s is not None:
            return self.given_p99_tbt_s
        return None if self.decode_step_s is None else self.multiple * self.decode_step_s

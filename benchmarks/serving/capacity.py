"""Capacity: the highest Poisson request rate whose run still meets the SLO, found by
bracketing (doubling or halving from a first guess) and then bisection, as the paper does.

The search is a function of a `probe(rate)` coroutine only, so it is tested without a server;
cli.py supplies a probe that runs the workload against a real one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from benchmarks.serving.metrics import RunSummary


@dataclass(frozen=True)
class SearchParams:
    initial_rate: float = 1.0  # requests/s
    min_rate: float = 0.01  # below this the server is declared to have no capacity
    max_rate: float = 10_000.0
    max_probes: int = 8
    # Bisection stops when the gap between the best passing and the lowest failing rate is
    # within this fraction of the passing one.
    rel_tol: float = 0.1

    def __post_init__(self) -> None:
        if not 0 < self.min_rate <= self.initial_rate <= self.max_rate:
            raise ValueError("need 0 < min_rate <= initial_rate <= max_rate")
        if self.max_probes < 1 or self.rel_tol <= 0:
            raise ValueError("need max_probes >= 1 and rel_tol > 0")


@dataclass(frozen=True)
class Probe:
    rate: float
    passed: bool
    violations: tuple[str, ...]  # empty when passed
    summary: RunSummary | None = None  # None for probes made up in tests
    stopped_early: str | None = None


@dataclass
class CapacityResult:
    policy: str
    capacity_rate: float  # 0.0 when even min_rate failed
    probes: list[Probe] = field(default_factory=list)
    error: str | None = None  # why the policy could not be measured (its server did not start)
    # Requests/s with the whole workload sent at once: an upper bound no SLO can beat.
    saturation_rate: float | None = None

    @property
    def at_capacity(self) -> Probe | None:
        """The probe that set the capacity (the passing probe at the highest rate)."""
        passing = [p for p in self.probes if p.passed and p.rate == self.capacity_rate]
        return passing[-1] if passing else None


async def search_capacity(
    policy: str, probe: Callable[[float], Awaitable[Probe]], params: SearchParams
) -> CapacityResult:
    result = CapacityResult(policy, 0.0)
    best_pass: float | None = None
    lowest_fail: float | None = None
    rate = params.initial_rate
    while len(result.probes) < params.max_probes:
        outcome = await probe(rate)
        result.probes.append(outcome)
        if outcome.passed:
            best_pass = rate if best_pass is None else max(best_pass, rate)
        else:
            lowest_fail = rate if lowest_fail is None else min(lowest_fail, rate)
        next_rate = _next_rate(best_pass, lowest_fail, params)
        if next_rate is None:
            break
        rate = next_rate
    result.capacity_rate = best_pass or 0.0
    return result


def _next_rate(best_pass: float | None, lowest_fail: float | None, params: SearchParams) -> float | None:
    """The next rate to probe, or None when the search is done."""
    if lowest_fail is None:  # everything passed so far: go up
        assert best_pass is not None
        return None if best_pass >= params.max_rate else min(best_pass * 2, params.max_rate)
    if best_pass is None:  # everything failed so far: go down
        return None if lowest_fail <= params.min_rate else max(lowest_fail / 2, params.min_rate)
    if lowest_fail <= best_pass:
        # A noisy probe failed below a passing one; the lower bracket is all that can be said.
        return None
    if (lowest_fail - best_pass) / best_pass <= params.rel_tol:
        return None
    return (best_pass + lowest_fail) / 2

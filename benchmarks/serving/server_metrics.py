"""The server's side of a run, read from its Prometheus `/metrics` page while the run goes on:
running and waiting requests and KV-cache use over time, and per-run totals (iterations, mean
iteration time, prefill and generated tokens, preemptions) as differences between the first
and last scrape.

The client cannot see batch composition itself; sampling the scheduler's gauges every half
second gives the timeline plot without a server-side trace.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from dataclasses import dataclass, field

SAMPLE_INTERVAL_S = 0.5
TIMELINE_GAUGES = (
    "sarathi_requests_running",
    "sarathi_requests_waiting",
    "sarathi_kv_cache_usage_ratio",
)
# Counters whose increase over a run is reported: (name in the report, Prometheus sample name).
RUN_TOTALS = (
    ("iterations", "sarathi_iteration_seconds_count"),
    ("iteration_seconds_sum", "sarathi_iteration_seconds_sum"),
    ("prefill_tokens", "sarathi_prefill_tokens_total"),
    ("generated_tokens", "sarathi_generated_tokens_total"),
    ("preemptions", "sarathi_preemptions_total"),
)


def parse_prometheus_text(text: str) -> dict[str, float]:
    """Sample name (with its labels, as written) -> value; comments skipped."""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            samples[name] = float(value)
        except ValueError:
            continue
    return samples


def scrape(url: str, timeout_s: float = 2.0) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return parse_prometheus_text(response.read().decode())


@dataclass
class MetricsTimeline:
    url: str
    times_s: list[float] = field(default_factory=list)  # time.perf_counter() of each scrape
    samples: list[dict[str, float]] = field(default_factory=list)
    errors: int = 0

    def shifted(self, clock_start: float) -> MetricsTimeline:
        """The same samples with times on a run's clock (seconds after `clock_start`)."""
        return MetricsTimeline(self.url, [t - clock_start for t in self.times_s], self.samples, self.errors)

    def series(self, name: str) -> list[float]:
        return [s.get(name, float("nan")) for s in self.samples]

    def run_totals(self) -> dict[str, float]:
        """Increase of each counter between the first and the last scrape, and the mean
        iteration time over the run."""
        if len(self.samples) < 2:
            return {}
        first, last = self.samples[0], self.samples[-1]
        totals = {key: last[name] - first[name] for key, name in RUN_TOTALS if name in first and name in last}
        if totals.get("iterations"):
            totals["mean_iteration_s"] = totals["iteration_seconds_sum"] / totals["iterations"]
        return totals


def is_idle(sample: dict[str, float]) -> bool:
    return (
        sample.get("sarathi_requests_running", 0.0) == 0 and sample.get("sarathi_requests_waiting", 0.0) == 0
    )


async def wait_until_idle(url: str, timeout_s: float) -> bool:
    """Waits until the scheduler holds no request. Requests cancelled by an early stop take a
    moment to leave the server; a probe started before would inherit their load."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        try:
            if is_idle(await asyncio.to_thread(scrape, url)):
                return True
        except OSError:
            pass
        await asyncio.sleep(SAMPLE_INTERVAL_S / 2)
    return False


async def sample_metrics(url: str, stop: asyncio.Event) -> MetricsTimeline:
    """Scrapes `url` every SAMPLE_INTERVAL_S until `stop` is set, then once more."""
    timeline = MetricsTimeline(url)

    async def take() -> None:
        try:
            sample = await asyncio.to_thread(scrape, url)
        except OSError:
            timeline.errors += 1  # a missed sample leaves a gap, not a failed run
            return
        timeline.times_s.append(time.perf_counter())
        timeline.samples.append(sample)

    while not stop.is_set():
        await take()
        try:
            await asyncio.wait_for(stop.wait(), SAMPLE_INTERVAL_S)
        except asyncio.TimeoutError:
            pass
    await take()
    return timeline

"""Seeded, reproducible workloads: how long each request is and when it arrives.

A workload is a list of `RequestSpec`s built from a `WorkloadConfig`. Lengths come from a fixed
pair, uniform or Zipf ranges, or a trace file; arrivals from a Poisson or gamma process, all at
once ("static", as in the Sarathi-Serve artifact), or the trace's own timestamps. The same config
and seed always give the same list, so two policies are compared on identical requests.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TRACES_DIR = Path(__file__).resolve().parent / "traces"
# Short names for the traces shipped with the package (see traces/README.md).
SHIPPED_TRACES = {"chat": TRACES_DIR / "chat.csv", "arxiv": TRACES_DIR / "arxiv.csv"}

LENGTH_KINDS = ("fixed", "uniform", "zipf", "trace")
ARRIVAL_KINDS = ("poisson", "gamma", "static", "trace")


@dataclass(frozen=True)
class RequestSpec:
    index: int
    num_prompt_tokens: int
    num_output_tokens: int  # sent as max_tokens with ignore_eos, so the server generates exactly this
    arrival_s: float  # seconds after the start of the run


@dataclass(frozen=True)
class TraceRow:
    num_prompt_tokens: int
    num_output_tokens: int
    arrival_s: float | None  # only traces that record timestamps have them


@dataclass(frozen=True)
class WorkloadConfig:
    num_requests: int = 32
    seed: int = 0
    lengths: str = "fixed"
    # (low, high) inclusive; `fixed` uses the low end only.
    prompt_tokens: tuple[int, int] = (128, 128)
    output_tokens: tuple[int, int] = (32, 32)
    zipf_theta: float = 1.1
    trace: str | None = None  # a path, or a SHIPPED_TRACES name
    # Trace lengths are multiplied by this: the paper's chat prompts (median 1,730 tokens) are far
    # too long for a CPU run, and scaling keeps the shape of the distribution.
    length_scale: float = 1.0
    max_prompt_tokens: int | None = None
    max_output_tokens: int | None = None
    arrivals: str = "poisson"
    rate: float = 1.0  # requests per second (poisson, gamma)
    burstiness_cv: float = 1.0  # gamma: coefficient of variation of inter-arrival gaps; 1 = Poisson
    time_scale: float = 1.0  # trace arrivals: timestamps are multiplied by this

    def __post_init__(self) -> None:
        if self.lengths not in LENGTH_KINDS:
            raise ValueError(f"lengths must be one of {LENGTH_KINDS}, not {self.lengths!r}")
        if self.arrivals not in ARRIVAL_KINDS:
            raise ValueError(f"arrivals must be one of {ARRIVAL_KINDS}, not {self.arrivals!r}")
        if "trace" in (self.lengths, self.arrivals) and not self.trace:
            raise ValueError("a trace file is needed for trace lengths or arrivals")
        if self.num_requests < 1:
            raise ValueError("num_requests must be at least 1")
        if self.arrivals in ("poisson", "gamma") and not self.rate > 0:
            raise ValueError("rate must be positive")
        if self.burstiness_cv <= 0:
            raise ValueError("burstiness_cv must be positive")
        for low, high in (self.prompt_tokens, self.output_tokens):
            if not 1 <= low <= high:
                raise ValueError(f"token range {low}:{high} must satisfy 1 <= low <= high")


def resolve_trace_path(trace: str) -> Path:
    return SHIPPED_TRACES.get(trace, Path(trace))


def load_trace(path: Path) -> list[TraceRow]:
    """Reads a CSV (with a header) or JSONL trace: `num_prompt_tokens`, `num_output_tokens` and
    optionally `arrival_s` per row. The shorter names `prompt_tokens` / `output_tokens` work too."""
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    elif path.suffix == ".csv":
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        raise ValueError(f"{path}: a trace must be .csv or .jsonl")
    if not rows:
        raise ValueError(f"{path}: the trace is empty")
    return [_trace_row(row, path, i) for i, row in enumerate(rows)]


def _trace_row(row: dict, path: Path, i: int) -> TraceRow:
    def pick(*names: str) -> str | int | float | None:
        for name in names:
            if name in row and row[name] not in (None, ""):
                return row[name]
        return None

    prompt = pick("num_prompt_tokens", "prompt_tokens")
    output = pick("num_output_tokens", "output_tokens")
    if prompt is None or output is None:
        raise ValueError(f"{path} row {i}: needs num_prompt_tokens and num_output_tokens")
    arrival = pick("arrival_s")
    return TraceRow(int(prompt), int(output), None if arrival is None else float(arrival))


def build_workload(config: WorkloadConfig) -> list[RequestSpec]:
    # Separate streams for lengths and arrivals: changing the rate must not change the lengths,
    # so a capacity search probes every rate with the same requests.
    length_rng = np.random.default_rng([config.seed, 0])
    arrival_rng = np.random.default_rng([config.seed, 1])
    trace = load_trace(resolve_trace_path(config.trace)) if config.trace else None
    prompts, outputs = _lengths(config, length_rng, trace)
    arrivals = _arrivals(config, arrival_rng, trace)
    return [
        RequestSpec(i, int(p), int(o), float(a))
        for i, (p, o, a) in enumerate(zip(prompts, outputs, arrivals, strict=True))
    ]


def _lengths(
    config: WorkloadConfig, rng: np.random.Generator, trace: list[TraceRow] | None
) -> tuple[np.ndarray, np.ndarray]:
    n = config.num_requests
    if config.lengths == "fixed":
        prompts = np.full(n, config.prompt_tokens[0])
        outputs = np.full(n, config.output_tokens[0])
    elif config.lengths == "uniform":
        prompts = rng.integers(config.prompt_tokens[0], config.prompt_tokens[1], n, endpoint=True)
        outputs = rng.integers(config.output_tokens[0], config.output_tokens[1], n, endpoint=True)
    elif config.lengths == "zipf":
        prompts = bounded_zipf(rng, *config.prompt_tokens, config.zipf_theta, n)
        outputs = bounded_zipf(rng, *config.output_tokens, config.zipf_theta, n)
    else:
        assert trace is not None
        rows = _trace_rows_for(config, rng, trace)
        prompts = np.array([r.num_prompt_tokens for r in rows]) * config.length_scale
        outputs = np.array([r.num_output_tokens for r in rows]) * config.length_scale
    prompts = np.maximum(1, np.rint(prompts)).astype(np.int64)
    outputs = np.maximum(1, np.rint(outputs)).astype(np.int64)
    if config.max_prompt_tokens is not None:
        prompts = np.minimum(prompts, config.max_prompt_tokens)
    if config.max_output_tokens is not None:
        outputs = np.minimum(outputs, config.max_output_tokens)
    return prompts, outputs


def _trace_rows_for(
    config: WorkloadConfig, rng: np.random.Generator, trace: list[TraceRow]
) -> list[TraceRow]:
    """Trace arrivals keep the file's order; otherwise rows are drawn in a seeded random order
    (without replacement, starting over when the trace is shorter than the workload)."""
    n = config.num_requests
    if config.arrivals == "trace":
        order = np.arange(n) % len(trace)
    else:
        passes = -(-n // len(trace))
        order = np.concatenate([rng.permutation(len(trace)) for _ in range(passes)])[:n]
    return [trace[i] for i in order]


def bounded_zipf(rng: np.random.Generator, low: int, high: int, theta: float, n: int) -> np.ndarray:
    """Values in [low, high] with P(low + k) proportional to 1 / (k + 1) ** theta: short
    requests are common and long ones rare, the shape of the Zipf workloads in the paper."""
    ranks = np.arange(1, high - low + 2, dtype=np.float64)
    weights = ranks**-theta
    return low + rng.choice(len(ranks), size=n, p=weights / weights.sum())


def _arrivals(config: WorkloadConfig, rng: np.random.Generator, trace: list[TraceRow] | None) -> np.ndarray:
    n = config.num_requests
    if config.arrivals == "static":
        return np.zeros(n)
    if config.arrivals == "poisson":
        gaps = rng.exponential(1.0 / config.rate, n)
    elif config.arrivals == "gamma":
        # Gamma with shape k = 1 / cv^2 and mean 1 / rate: cv > 1 gives bursts, cv < 1 regularity.
        shape = 1.0 / config.burstiness_cv**2
        gaps = rng.gamma(shape, 1.0 / (config.rate * shape), n)
    else:
        assert trace is not None
        stamps = [trace[i % len(trace)].arrival_s for i in range(n)]
        if any(s is None for s in stamps):
            raise ValueError("trace arrivals need an arrival_s column on every row")
        times = np.array(stamps, dtype=np.float64)
        # A trace that wraps around continues after its last timestamp rather than going back.
        span = float(max(s for s in stamps if s is not None)) if len(trace) < n else 0.0
        times = times + (np.arange(n) // len(trace)) * span
        times = (times - times[0]) * config.time_scale
        return np.maximum.accumulate(times)
    # The first request arrives at t = 0 so a run never starts with idle time.
    return np.concatenate([[0.0], np.cumsum(gaps[1:])])


def with_rate(config: WorkloadConfig, rate: float) -> WorkloadConfig:
    """The same workload (same lengths) at another Poisson or gamma rate."""
    return WorkloadConfig(**{**config.__dict__, "rate": rate})


def probe_workload(config: WorkloadConfig, rate: float, min_seconds: float) -> WorkloadConfig:
    """The workload of a capacity probe at `rate`: at least config.num_requests requests, and
    enough that arrivals span min_seconds. A fixed count turns a high-rate probe into a burst
    that ends before any queue builds up, so it passes whatever the server's capacity."""
    n = max(config.num_requests, math.ceil(rate * min_seconds))
    return WorkloadConfig(**{**config.__dict__, "rate": rate, "num_requests": n})

"""Writes a run's results: JSON (config, summary, every request's timeline), CSV (one row per
request) and PNG plots (CDFs of TTFT and TBT). Capacity results get their own JSON, CSV and plot
in capacity_report.py."""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.serving.metrics import RunSummary  # noqa: E402
from benchmarks.serving.records import RequestRecord  # noqa: E402
from benchmarks.serving.server_metrics import TIMELINE_GAUGES, MetricsTimeline  # noqa: E402

REQUEST_COLUMNS = (
    "index",
    "num_prompt_tokens",
    "num_output_tokens",
    "arrival_s",
    "sent_s",
    "ttft_s",
    "e2e_s",
    "normalized_latency_s",
    "num_received_tokens",
    "mean_tbt_s",
    "max_tbt_s",
    "scheduling_delay_s",
    "finish_reason",
    "error",
)


@dataclass(frozen=True)
class RunFiles:
    json: Path
    csv: Path
    ttft_cdf: Path
    tbt_cdf: Path
    timeline: Path | None  # only when the server's metrics were sampled

    def paths(self) -> list[Path]:
        return [p for p in (self.json, self.csv, self.ttft_cdf, self.tbt_cdf, self.timeline) if p is not None]


def file_stem(label: str) -> str:
    """A label as a portable file name: `sarathi:128` -> `sarathi_128`."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "run"


def to_jsonable(value: Any) -> Any:
    """Dataclasses to dicts, NaN to null (JSON has no NaN), tuples to lists."""
    if is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(asdict(value))
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def request_row(record: RequestRecord) -> dict[str, Any]:
    gaps = record.tbt_gaps_s
    return {
        "index": record.index,
        "num_prompt_tokens": record.num_prompt_tokens,
        "num_output_tokens": record.num_output_tokens,
        "arrival_s": record.arrival_s,
        "sent_s": record.sent_s,
        "ttft_s": record.ttft_s,
        "e2e_s": record.e2e_s,
        "normalized_latency_s": record.normalized_latency_s,
        "num_received_tokens": record.num_received_tokens,
        "mean_tbt_s": sum(gaps) / len(gaps) if gaps else None,
        "max_tbt_s": max(gaps) if gaps else None,
        "scheduling_delay_s": record.scheduling_delay_s,
        "finish_reason": record.finish_reason,
        "error": record.error,
    }


def write_run_report(
    out_dir: Path,
    label: str,
    records: Sequence[RequestRecord],
    summary: RunSummary,
    metadata: Mapping[str, Any],
    server_metrics: MetricsTimeline | None = None,
) -> RunFiles:
    """`metadata`: whatever makes the run reproducible (workload config, server, command)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    has_timeline = server_metrics is not None and len(server_metrics.samples) >= 2
    stem = file_stem(label)
    files = RunFiles(
        json=out_dir / f"{stem}.json",
        csv=out_dir / f"{stem}_requests.csv",
        ttft_cdf=out_dir / f"{stem}_ttft_cdf.png",
        tbt_cdf=out_dir / f"{stem}_tbt_cdf.png",
        timeline=out_dir / f"{stem}_timeline.png" if has_timeline else None,
    )
    document = {
        "label": label,
        "metadata": metadata,
        "summary": summary,
        "server_metrics": None if server_metrics is None else server_metrics_document(server_metrics),
        "requests": [
            {**request_row(r), "chunk_times_s": r.chunk_times_s, "chunk_num_tokens": r.chunk_num_tokens}
            for r in records
        ],
    }
    files.json.write_text(json.dumps(to_jsonable(document), indent=1) + "\n")
    with files.csv.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=REQUEST_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(request_row(r) for r in records)
    ttft = {label: [r.ttft_s for r in records if r.ttft_s is not None]}
    tbt = {label: [gap for r in records for gap in r.tbt_gaps_s]}
    plot_cdfs(ttft, "TTFT (s)", f"Time to first token: {label}", files.ttft_cdf)
    plot_cdfs(tbt, "time between tokens (s)", f"Time between tokens: {label}", files.tbt_cdf)
    if files.timeline is not None and server_metrics is not None:
        plot_timeline(records, server_metrics, f"Timeline: {label}", files.timeline)
    return files


def server_metrics_document(timeline: MetricsTimeline) -> dict[str, Any]:
    return {
        "url": timeline.url,
        "run_totals": timeline.run_totals(),
        "missed_scrapes": timeline.errors,
        "timeline": {"t_s": timeline.times_s, **{name: timeline.series(name) for name in TIMELINE_GAUGES}},
    }


def plot_timeline(
    records: Sequence[RequestRecord], timeline: MetricsTimeline, title: str, path: Path
) -> None:
    """Top: requests running and waiting at the scheduler (its batch and its queue); bottom:
    KV-cache use, and the tokens/s the client received, so a stall shows up against its cause."""
    fig, (queues, usage) = plt.subplots(2, 1, figsize=(8, 5), dpi=120, sharex=True)
    t = timeline.times_s
    queues.step(t, timeline.series("sarathi_requests_running"), where="post", label="running")
    queues.step(t, timeline.series("sarathi_requests_waiting"), where="post", label="waiting")
    queues.set_ylabel("requests")
    queues.set_title(title)
    queues.grid(alpha=0.3)
    queues.legend(fontsize=8, loc="upper left")
    usage.plot(
        t, [100 * v for v in timeline.series("sarathi_kv_cache_usage_ratio")], color="C2", label="KV use"
    )
    usage.set_ylabel("KV cache used (%)")
    usage.set_xlabel("time since the run started (s)")
    usage.grid(alpha=0.3)
    token_times = [time for r in records for time in r.chunk_times_s]
    if token_times and len(t) >= 2:
        rate = usage.twinx()
        edges = np.arange(0.0, max(max(token_times), t[-1]) + 1.0, 1.0)
        counts, _ = np.histogram(token_times, bins=edges)
        rate.step(edges[:-1], counts, where="post", color="C3", linewidth=1, label="tokens/s received")
        rate.set_ylabel("tokens/s received")
        rate.legend(fontsize=8, loc="upper right")
    usage.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_cdfs(
    samples: Mapping[str, Sequence[float]],
    xlabel: str,
    title: str,
    path: Path,
    slo_s: float | None = None,
) -> None:
    """One empirical CDF per label (policies on one plot compare at a glance); the P99 line is
    where SLOs are read."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, values in samples.items():
        if len(values) == 0:
            continue
        xs = np.sort(np.asarray(values, dtype=np.float64))
        ys = np.arange(1, xs.size + 1) / xs.size
        ax.step(xs, ys, where="post", label=f"{label} (n={xs.size})")
    ax.axhline(0.99, color="grey", linestyle=":", linewidth=1, label="P99")
    if slo_s is not None:
        ax.axvline(slo_s, color="red", linestyle="--", linewidth=1, label=f"SLO {slo_s * 1e3:.0f} ms")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of samples")
    ax.set_ylim(0, 1.01)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

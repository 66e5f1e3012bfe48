"""The capacity table (rich, in the terminal), and capacity.json / capacity.csv /
capacity.png beside it."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from rich.table import Table  # noqa: E402

from benchmarks.serving.capacity import CapacityResult, Probe  # noqa: E402
from benchmarks.serving.report import to_jsonable  # noqa: E402
from benchmarks.serving.slo import Slo  # noqa: E402

CAPACITY_COLUMNS = (
    "policy",
    "capacity_rps",
    "p99_tbt_s",
    "p99_ttft_s",
    "p50_ttft_s",
    "p50_scheduling_delay_s",
    "output_tokens_per_s",
    "num_probes",
    "saturation_rps",
    "error",
)


def capacity_row(result: CapacityResult) -> dict[str, Any]:
    probe = result.at_capacity
    summary = probe.summary if probe is not None else None
    return {
        "policy": result.policy,
        "capacity_rps": result.capacity_rate,
        "p99_tbt_s": summary.tbt_s.p99 if summary else None,
        "p99_ttft_s": summary.ttft_s.p99 if summary else None,
        "p50_ttft_s": summary.ttft_s.p50 if summary else None,
        "p50_scheduling_delay_s": summary.scheduling_delay_s.p50 if summary else None,
        "output_tokens_per_s": summary.output_token_throughput if summary else None,
        "num_probes": len(result.probes),
        "saturation_rps": result.saturation_rate,
        "error": result.error,
    }


def _ms(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value * 1e3:.0f} ms"


def capacity_table(results: Sequence[CapacityResult], slo: Slo, title: str) -> Table:
    errors = [f"{r.policy}: {r.error}" for r in results if r.error is not None]
    caption = "not measured: " + "; ".join(errors) if errors else None
    table = Table(title=f"{title}\nSLO: {slo.describe()}", caption=caption)
    columns = (
        "policy",
        "capacity (req/s)",
        "P99 TBT",
        "P99 TTFT",
        "P50 TTFT",
        "tokens/s",
        "probes",
        "saturated",
    )
    for name in columns:
        table.add_column(name, justify="left" if name == "policy" else "right")
    for result in results:
        row = capacity_row(result)
        tokens = row["output_tokens_per_s"]
        if result.error is not None:
            table.add_row(result.policy, "[red]not measured[/]", *["-"] * (len(columns) - 2))
            continue
        table.add_row(
            result.policy,
            f"{result.capacity_rate:.3g}" if result.capacity_rate > 0 else "none",
            _ms(row["p99_tbt_s"]),
            _ms(row["p99_ttft_s"]),
            _ms(row["p50_ttft_s"]),
            "-" if tokens is None else f"{tokens:.0f}",
            str(row["num_probes"]),
            "-" if result.saturation_rate is None else f"{result.saturation_rate:.3g} req/s",
        )
    return table


def write_capacity_report(
    out_dir: Path, results: Sequence[CapacityResult], slo: Slo, metadata: Mapping[str, Any]
) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "capacity.json",
        "csv": out_dir / "capacity.csv",
        "png": out_dir / "capacity.png",
    }
    document = {
        "metadata": metadata,
        "slo": slo,
        "table": [capacity_row(r) for r in results],
        "probes": {
            r.policy: [
                {
                    "rate": p.rate,
                    "passed": p.passed,
                    "violations": p.violations,
                    "stopped_early": p.stopped_early,
                    "summary": p.summary,
                }
                for p in r.probes
            ]
            for r in results
        },
    }
    paths["json"].write_text(json.dumps(to_jsonable(document), indent=1) + "\n")
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CAPACITY_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(capacity_row(r) for r in results)
    plot_capacity(results, slo, paths["png"])
    return paths


def plot_capacity(results: Sequence[CapacityResult], slo: Slo, path: Path) -> None:
    """Left: capacity per policy. Right: every probe's P99 TBT against its rate (filled when it
    met the SLO), the SLO as a line: the search made visible."""
    fig, (bars, probes) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    names = [r.policy for r in results]
    colors = [f"C{i}" for i in range(len(results))]
    bars.bar(names, [r.capacity_rate for r in results], color=colors)
    bars.set_ylabel("capacity (requests/s)")
    bars.set_ylim(bottom=0, top=max([r.capacity_rate for r in results] + [0.0]) * 1.15 or 1.0)
    bars.set_title("Capacity under the SLO")
    plot_probes(probes, [(r.policy, r.probes) for r in results], slo.p99_tbt_s)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_probes(axis, series: Sequence[tuple[str, Sequence[Probe]]], p99_tbt_bound_s: float | None) -> None:
    """Every probe's P99 TBT (ms) against its rate, one colour per series (C0, C1, ... as the
    other panels), filled where it met the SLO, and the bound as a line: the search made visible."""
    for i, (label, probes) in enumerate(series):
        points = sorted((p.rate, p.summary.tbt_s.p99 * 1e3, p.passed) for p in probes if p.summary)
        if not points:
            continue
        axis.plot([r for r, _, _ in points], [t for _, t, _ in points], color=f"C{i}", linewidth=1,
                  label=label)
        for rate, p99, passed in points:
            axis.scatter(rate, p99, color=f"C{i}", facecolors=f"C{i}" if passed else "none", zorder=3)
    if p99_tbt_bound_s is not None:
        axis.axhline(p99_tbt_bound_s * 1e3, color="red", linestyle="--", linewidth=1, label="P99 TBT SLO")
    axis.set_xlabel("request rate (requests/s)")
    axis.set_ylabel("P99 TBT (ms)")
    axis.set_title("Probes (hollow: SLO missed)")
    axis.grid(alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=8)

"""The peer run's one table (rich), and peer.json / peer.png beside it."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from rich.table import Table  # noqa: E402

from benchmarks.peer.results import SloAnchor, SystemResult  # noqa: E402
from benchmarks.serving.capacity import Probe  # noqa: E402
from benchmarks.serving.capacity_report import plot_probes  # noqa: E402
from benchmarks.serving.report import to_jsonable  # noqa: E402
from benchmarks.serving.slo import Slo  # noqa: E402

TABLE_COLUMNS = (
    "system", "capacity (req/s)", "probe rate", "P99 TBT", "P50 TTFT", "verdict",
    "output tok/s at capacity", "offline output tok/s", "start",
)


def _ms(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value * 1e3:.1f} ms"


def _s(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value:.2f} s"


def tokens_at_capacity(result: SystemResult) -> float | None:
    probe = result.at_capacity
    return probe.summary.output_token_throughput if probe is not None and probe.summary else None


def probe_cells(probe: Probe | None) -> list[str]:
    if probe is None:
        return ["-"] * 4
    summary = probe.summary
    verdict = "[green]pass[/]" if probe.passed else "[red]fail[/]"
    if summary is None:
        return [f"{probe.rate:.3g}", "-", "-", verdict]
    return [f"{probe.rate:.3g}", _ms(summary.tbt_s.p99), _s(summary.ttft_s.p50), verdict]


def best(results: Sequence[SystemResult], engine: str, value: str) -> tuple[str, float] | None:
    """The system of `engine` with the highest capacity ("capacity") or offline tok/s."""
    scored = []
    for r in results:
        if r.engine != engine:
            continue
        if value == "capacity":
            score = r.capacity_rate
        else:
            score = r.offline.output_tokens_per_s if r.offline else None
        if score:
            scored.append((r.label, score))
    return max(scored, key=lambda item: item[1]) if scored else None


def comparison(results: Sequence[SystemResult]) -> dict[str, Any]:
    """Ours against vLLM, each at its best entry: the two acceptance figures."""
    out: dict[str, Any] = {}
    for value in ("capacity", "offline"):
        ours, theirs = best(results, "ours", value), best(results, "vllm", value)
        out[value] = {
            "ours": ours, "vllm": theirs, "ratio": ours[1] / theirs[1] if ours and theirs else None,
        }
    return out


def comparison_line(results: Sequence[SystemResult]) -> str | None:
    parts = []
    for value, unit, fmt in (("capacity", "req/s", "{:.3g}"), ("offline", "output tok/s", "{:,.0f}")):
        c = comparison(results)[value]
        if c["ratio"] is not None:
            (ours, ours_value), (vllm, vllm_value) = c["ours"], c["vllm"]
            parts.append(f"{value}: ours {ours} {fmt.format(ours_value)} {unit} / vLLM {vllm} "
                         f"{fmt.format(vllm_value)} {unit} = {c['ratio']:.2f}x")
    return "\n".join(parts) or None


def anchor_line(anchor: SloAnchor, slo: Slo | None) -> str:
    if anchor.given_p99_tbt_s is not None:
        source = "given (--slo-p99-tbt-ms)"
    elif anchor.decode_step_s is not None:
        source = (f"{anchor.multiple:g} x vLLM's decode step {anchor.decode_step_s * 1e3:.2f} ms "
                  f"(b32, ctx 4096, measured by {anchor.measured_by})")
    else:
        source = "not measured"
    bound = "" if anchor.p99_tbt_s is None else f" {anchor.p99_tbt_s * 1e3:.1f} ms"
    return f"SLO: {slo.describe() if slo else 'none'}; P99 TBT bound{bound}: {source}"


def peer_table(results: Sequence[SystemResult], anchor: SloAnchor, slo: Slo | None, title: str) -> Table:
    notes = [f"{r.label}: {r.error}" for r in results if r.error]
    line = comparison_line(results)
    caption = "\n".join(([line] if line else []) + notes) or None
    table = Table(title=f"{title}\n{anchor_line(anchor, slo)}", caption=caption)
    for name in TABLE_COLUMNS:
        table.add_column(name, justify="left" if name in ("system", "verdict") else "right")
    for result in results:
        probes = sorted(result.probes, key=lambda p: p.rate) or [None]
        tokens = tokens_at_capacity(result)
        if result.capacity_rate is None:
            capacity = "-"
        else:
            capacity = f"{result.capacity_rate:.3g}" if result.capacity_rate > 0 else "none"
        if result.error:
            capacity += " [yellow](incomplete)[/]"
        first = [
            result.label,
            capacity,
            *probe_cells(probes[0]),
            "-" if tokens is None else f"{tokens:,.0f}",
            "-" if result.offline is None else f"{result.offline.output_tokens_per_s:,.0f}",
            "-" if result.startup_s is None else f"{result.startup_s:.0f} s",
        ]
        table.add_row(*first)
        for probe in probes[1:]:
            table.add_row("", "", *probe_cells(probe), "", "", "")
        table.add_section()
    return table


def probe_row(probe: Probe) -> dict[str, Any]:
    s = probe.summary
    return {
        "rate": probe.rate,
        "passed": probe.passed,
        "violations": probe.violations,
        "stopped_early": probe.stopped_early,
        "p99_tbt_s": s.tbt_s.p99 if s else None,
        "p50_ttft_s": s.ttft_s.p50 if s else None,
        "output_tokens_per_s": s.output_token_throughput if s else None,
        "summary": s,
    }


def system_row(result: SystemResult) -> dict[str, Any]:
    return {
        "system": result.label,
        "engine": result.engine,
        "budget": result.budget,
        "capacity_rps": result.capacity_rate,
        "output_tokens_per_s_at_capacity": tokens_at_capacity(result),
        "offline": result.offline,
        "startup_s": result.startup_s,
        "error": result.error,
        "probes": [probe_row(p) for p in result.probes],
    }


def peer_document(
    results: Sequence[SystemResult], anchor: SloAnchor, slo: Slo | None, metadata: Mapping[str, Any]
) -> dict[str, Any]:
    return to_jsonable({
        "metadata": metadata,
        "anchor": {**to_jsonable(anchor), "p99_tbt_s": anchor.p99_tbt_s},
        "slo": slo,
        "comparison": comparison(results),
        "systems": [system_row(r) for r in results],
    })


def write_peer_report(
    out_dir: Path, results: Sequence[SystemResult], anchor: SloAnchor, slo: Slo | None,
    metadata: Mapping[str, Any],
) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / "peer.json", out_dir / "peer.png"
    json_path.write_text(json.dumps(peer_document(results, anchor, slo, metadata), indent=1) + "\n")
    plot_peer(results, slo, png_path)
    return [json_path, png_path]


def plot_peer(results: Sequence[SystemResult], slo: Slo | None, path: Path) -> None:
    """Capacity per system, every probe's P99 TBT against its rate (hollow: missed the SLO),
    and offline output tok/s per system: the panels of what the run measured."""
    names = [r.label for r in results]
    colors = [f"C{i}" for i in range(len(results))]
    probed = any(r.probes for r in results)
    offline_run = any(r.offline for r in results)
    panels = max(2 * probed + offline_run, 1)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), dpi=120, squeeze=False)
    axes = list(axes[0])
    if probed:
        bars, probes = axes.pop(0), axes.pop(0)
        bars.bar(names, [r.capacity_rate or 0.0 for r in results], color=colors)
        bars.set_ylabel("capacity (requests/s)")
        bars.set_title("Capacity under the SLO")
        bars.tick_params(axis="x", labelrotation=20)
        plot_probes(probes, [(r.label, r.probes) for r in results], slo.p99_tbt_s if slo else None)
    if offline_run:
        offline = axes.pop(0)
        offline.bar(names, [r.offline.output_tokens_per_s if r.offline else 0.0 for r in results],
                    color=colors)
        offline.set_ylabel("output tokens/s")
        offline.set_title("Offline throughput")
        offline.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

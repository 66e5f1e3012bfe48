"""Iterations whose launch held the host (a probe's iteration trace, as the peer run saves it):
where the worker's forward took longer than an iteration, the host waited for the device, and
every stream in flight missed a turn (its time between tokens doubles).

  python -m benchmarks.serving.stalls benchmarks/peer/results/.../*_iterations.json [--over-ms 40]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def stalled(rows: list[dict], over_ms: float) -> list[dict]:
    return [r for r in rows if r["worker_forward_ms"] > over_ms]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("traces", type=Path, nargs="+")
    ap.add_argument("--over-ms", type=float, default=40.0, help="a forward launch longer than this")
    args = ap.parse_args()
    print("| trace | step | forward ms | device ms | decodes | prefill tokens | stalls / iterations |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for path in args.traces:
        rows = json.loads(path.read_text())
        found = stalled(rows, args.over_ms)
        for r in found:
            print(f"| {path.name} | {r['step_id']} | {r['worker_forward_ms']:.1f} | "
                  f"{r['worker_device_ms']:.1f} | {r['num_decode_tokens']} | {r['num_prefill_tokens']} | "
                  f"{len(found)} / {len(rows)} |")


if __name__ == "__main__":
    main()

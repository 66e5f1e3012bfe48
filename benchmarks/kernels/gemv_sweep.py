"""Decode projections at small batch: cuBLAS (F.linear) against kernels/gemv.py's configs.

Llama-3-8B's weight shapes, bf16. Each variant runs 20 times inside one CUDA graph (as in a
decode graph) and the replay is timed; the table gives microseconds per call and the weight
bandwidth (bytes of W per second), and the best config per shape. Weights smaller than the L2
cache (50 MB on an H100: qkv, o_proj) are partly re-read from it by the repeated calls, which
flatters both columns for those shapes; in a model every layer's weights differ.

  python -m benchmarks.kernels.gemv_sweep [--rows 1 8]
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from benchmarks.kernels.graph_timing import microseconds_per_call
from sarathi_kernels.gemv import gemv

DEV = torch.device("cuda")
SHAPES = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096),
          "down": (4096, 14336), "lm_head": (128256, 4096)}
CONFIGS = [c for c in itertools.product((16, 32, 64), (128, 256, 512), (4, 8), (3, 5))
           if c[0] * c[1] <= 16384]
REPS = 20


def timed(fn) -> float:
    """Microseconds per call, from a graph of REPS calls."""
    return microseconds_per_call([fn] * REPS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    args = ap.parse_args()
    print(f"Skinny matmuls, {torch.cuda.get_device_name()}, {len(CONFIGS)} configs\n")
    print("| shape | rows | cuBLAS | best gemv | config (BLOCK_N, BLOCK_K, warps, stages) |")
    print("| --- | --- | --- | --- | --- |")
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device=DEV, dtype=torch.bfloat16) / k ** 0.5
        gb = w.numel() * 2 / 1e3   # bytes per microsecond -> GB/s / 1e3 = TB/s below
        for m in args.rows:
            x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
            ref = F.linear(x, w)
            base = timed(lambda x=x, w=w: F.linear(x, w))
            best = (float("inf"), None)
            for cfg in CONFIGS:
                try:
                    if not torch.allclose(gemv(x, w, config=cfg).float(), ref.float(), rtol=2e-2, atol=2e-2):
                        continue
                    us = timed(lambda x=x, w=w, cfg=cfg: gemv(x, w, config=cfg))
                except Exception:  # noqa: BLE001 - a config that does not compile (shared memory)
                    continue
                best = min(best, (us, cfg), key=lambda t: t[0])
            print(f"| {name} {n}x{k} | {m} | {base:.1f} us ({gb / base / 1e3:.2f} TB/s) | "
                  f"{best[0]:.1f} us ({gb / best[0] / 1e3:.2f} TB/s) | {best[1]} |", flush=True)


if __name__ == "__main__":
    main()

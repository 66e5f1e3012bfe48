"""The projections of a hybrid iteration (a few hundred to a few thousand tokens): cuBLAS's
choices against the alternatives, per shape, at the achieved TFLOP/s.

Llama-3-8B's weight shapes, bf16, M = the iteration's tokens. Each call uses the next of 8
weight copies, so weights come from HBM as in a model (every layer's differ) rather than from
the L2 cache. Variants: F.linear as the model calls it (cuBLAS), the cuBLASLt backend, the
weight stored transposed (x @ W^T as a plain matmul of a [K, N] weight), and torch.compile's
max-autotune (Triton templates against cuBLAS) for the shapes given by --autotune-m.

  python -m benchmarks.kernels.gemm_shapes [--m 576 1088 2112] [--autotune-m 576]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.kernels.graph_timing import microseconds_per_call

DEV = torch.device("cuda")
SHAPES = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
COPIES = 8


def tflops(m: int, n: int, k: int, us: float) -> float:
    return 2 * m * n * k / (us * 1e-6) / 1e12


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, nargs="+", default=[576, 1088, 2112])
    ap.add_argument("--autotune-m", type=int, nargs="*", default=[576])
    args = ap.parse_args()
    print("| shape | M | cuBLAS us (TFLOP/s) | cuBLASLt | W stored transposed | max-autotune |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, (n, k) in SHAPES.items():
        weights = [torch.randn(n, k, device=DEV, dtype=torch.bfloat16) / 64 for _ in range(COPIES)]
        transposed = [w.t().contiguous() for w in weights]
        for m in args.m:
            x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
            cells = []
            for library in ("cublas", "cublaslt"):
                torch.backends.cuda.preferred_blas_library(library)
                us = microseconds_per_call([lambda w=w, x=x: F.linear(x, w) for w in weights])
                cells.append(f"{us:.1f} ({tflops(m, n, k, us):.0f})")
            torch.backends.cuda.preferred_blas_library("cublas")
            us = microseconds_per_call([lambda w=w, x=x: x @ w for w in transposed])
            cells.append(f"{us:.1f} ({tflops(m, n, k, us):.0f})")
            if m in args.autotune_m:
                linear = torch.compile(F.linear, mode="max-autotune-no-cudagraphs", dynamic=False)
                us = microseconds_per_call([lambda w=w, x=x, f=linear: f(x, w) for w in weights])
                cells.append(f"{us:.1f} ({tflops(m, n, k, us):.0f})")
            else:
                cells.append("-")
            print(f"| {name} {n}x{k} | {m} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

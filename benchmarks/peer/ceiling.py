"""`python -m benchmarks.peer.ceiling`: the most a GPU can serve of a workload, kernel by kernel.

Per request: every token it puts through the layers (prompt, then each output but the last) at
the matmul rate, its attention FLOPs, the LM head of each sampled token, and the KV its decodes
read at the copy bandwidth. Weights are read under the matmuls (a lower bound: decode-only steps
at small batches read them again). Sequential is what kernel-by-kernel execution cannot beat;
overlapped takes the longer of FLOPs and KV reads, as if decode attention ran entirely beside
the GEMMs (POD-Attention's aim). A steady state above these rates only grows queues: a capacity
measured above them holds for the length of the probe, not indefinitely.

    python -m benchmarks.peer.ceiling                       # chat trace and 1000 x (512, 256), H200
    python -m benchmarks.peer.ceiling --matmul-tflops 693 --copy-tbps 4.22 --model llama3-8b
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from benchmarks.step.floors import attention_flops, kv_bytes, lm_head_flops, matmul_params

# Measured on one H200 by gpu_bench (2026-12-02): bf16 matmul 8192^3 and device-to-device copy.
H200_MATMUL_TFLOPS = 693.0
H200_COPY_TBPS = 4.22


@dataclass(frozen=True)
class RequestWork:
    flops: float
    kv_read_bytes: float


def request_work(config, prompt_tokens: int, output_tokens: int) -> RequestWork:
    """The prefill of `prompt_tokens` (causal) and `output_tokens - 1` decodes, decode i at
    context prompt + i (it attends to itself too)."""
    p, decodes = prompt_tokens, max(output_tokens - 1, 0)
    decode_context = decodes * p + decodes * (decodes + 1) / 2   # sum of p + i, i = 1..decodes
    flops = (
        2 * matmul_params(config) * (p + decodes)
        + attention_flops(config, p * (p + 1) / 2 + decode_context)
        + lm_head_flops(config, min(output_tokens, 1) + decodes)
    )
    return RequestWork(flops, kv_bytes(config, decode_context))


@dataclass(frozen=True)
class Ceiling:
    workload: str
    requests: int
    mean_output_tokens: float
    tflop_per_request: float
    kv_gb_per_request: float
    sequential_s: float   # per request, mean
    overlapped_s: float

    @property
    def sequential_rps(self) -> float:
        return 1 / self.sequential_s

    @property
    def overlapped_rps(self) -> float:
        return 1 / self.overlapped_s


def ceiling(config, name: str, lengths: Sequence[tuple[int, int]], matmul_rate: float,
            copy_bw: float) -> Ceiling:
    work = [request_work(config, p, o) for p, o in lengths]
    n = len(work)
    flops = sum(w.flops for w in work)
    kv = sum(w.kv_read_bytes for w in work)
    return Ceiling(
        name, n, sum(o for _, o in lengths) / n, flops / n / 1e12, kv / n / 1e9,
        (flops / matmul_rate + kv / copy_bw) / n,
        # Over the whole workload: FLOPs and KV reads of all requests overlap one another.
        max(flops / matmul_rate, kv / copy_bw) / n,
    )


def model_config(name: str):
    from sarathi_common.model_spec import resolve
    from worker_service.models.config import ModelConfig
    from worker_service.models.loader import hf_config_for  # lazy: it loads torch

    return ModelConfig.from_hf(hf_config_for(resolve(f"dummy:{name}")), name)


def trace_lengths(trace: str) -> list[tuple[int, int]]:
    from benchmarks.serving.workload import load_trace, resolve_trace_path

    return [(r.num_prompt_tokens, r.num_output_tokens) for r in load_trace(resolve_trace_path(trace))]


def table(rows: list[Ceiling], title: str) -> Table:
    t = Table(title=title)
    for column in ("workload", "requests", "TFLOP / request", "KV read / request", "floor / request",
                   "ceiling (sequential)", "output tok/s", "ceiling (overlapped)"):
        first = column == "workload"
        t.add_column(column, justify="left" if first else "right", no_wrap=first)
    for c in rows:
        t.add_row(
            c.workload, f"{c.requests:,}", f"{c.tflop_per_request:.1f}", f"{c.kv_gb_per_request:.1f} GB",
            f"{c.sequential_s * 1e3:.1f} ms", f"{c.sequential_rps:.1f} req/s",
            f"{c.sequential_rps * c.mean_output_tokens:,.0f}", f"{c.overlapped_rps:.1f} req/s",
        )
    return t


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peer.ceiling",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama3-8b", help="a dummy shape (default llama3-8b)")
    p.add_argument("--trace", default="chat", help="chat, arxiv or a .csv/.jsonl path")
    p.add_argument("--offline", default="1000x512x256", help="N x prompt x output, fixed lengths")
    p.add_argument("--matmul-tflops", type=float, default=H200_MATMUL_TFLOPS)
    p.add_argument("--copy-tbps", type=float, default=H200_COPY_TBPS, help="read + write, as gpu_bench")
    args = p.parse_args(argv)
    config = model_config(args.model)
    mm, bw = args.matmul_tflops * 1e12, args.copy_tbps * 1e12
    n, prompt, output = (int(x) for x in args.offline.split("x"))
    rows = [ceiling(config, f"trace {args.trace}", trace_lengths(args.trace), mm, bw),
            ceiling(config, f"offline {n} x ({prompt}, {output})", [(prompt, output)] * n, mm, bw)]
    console = Console(width=max(Console().width, 130))
    title = f"{args.model}: matmul {args.matmul_tflops:g} TFLOP/s, copy {args.copy_tbps:g} TB/s"
    console.print(table(rows, title))
    offline = rows[1]
    console.print(f"offline: at least {offline.sequential_s * n:.3g} s kernel by kernel "
                  f"({offline.sequential_rps * output:,.0f} output tok/s at most), "
                  f"{offline.overlapped_s * n:.3g} s overlapped")


if __name__ == "__main__":
    main()

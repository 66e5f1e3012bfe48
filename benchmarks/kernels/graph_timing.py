"""Timing GPU work the way decode graphs run it: several calls captured in one CUDA graph and
replayed, so the figure is device time without Python's launch overhead."""

from __future__ import annotations

from collections.abc import Callable

import torch


def graph_or_eager_ms(run: Callable[[], object], warmup: int = 20, rep: int = 200) -> tuple[float, str]:
    """Median device milliseconds of `run` (its work on any streams it forks), replayed as one
    CUDA graph, or eagerly (launch gaps included) where capture fails. -> (ms, "graph" or
    "eager")."""
    import triton.testing

    run()   # compile, autotune and allocate outside the capture
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        fn, how = graph.replay, "graph"
    except RuntimeError:
        torch.cuda.synchronize()
        fn, how = run, "eager"
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"), how


def microseconds_per_call(calls: list[Callable[[], object]]) -> float:
    """Median device time of one replay of all `calls` (captured in order), per call."""
    import triton.testing

    for call in calls:   # compile, autotune and allocate outside the capture
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    ms = triton.testing.do_bench(graph.replay, warmup=20, rep=200, return_mode="median")
    return ms * 1e3 / len(calls)

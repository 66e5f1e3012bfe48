"""Serving benchmark: workloads, an open-loop gRPC load client, metrics, reports, capacity search.

Entry points: `benchmarks.serving.cli:main_bench(argv)` and `main_capacity(argv)` (wired as
`sarathi bench` and `sarathi capacity`), or `python -m benchmarks.serving bench|capacity`.
"""

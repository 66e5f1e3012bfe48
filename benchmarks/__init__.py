"""Benchmarks: the serving benchmark (`serving/`, behind `sarathi bench` and `sarathi capacity`) and
scripts grouped by what they measure, each run as `python -m benchmarks.<group>.<script>` from the
repo root (benchmarks/README.md lists them)."""

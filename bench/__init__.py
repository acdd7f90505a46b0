"""Benchmarks: `python -m bench.run [--quick]` (see bench/README.md and docs/benchmarks.md)."""

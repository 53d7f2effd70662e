"""Benchmarks: ``python -m bench.pipeline`` measures the pipeline against the bare model (see docs/performance.md)."""

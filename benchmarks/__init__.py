"""Benchmarks: the baseline re-implementation of the original and the throughput script."""

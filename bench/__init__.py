"""Benchmarks: each script runs on its own (`python bench/bench_x.py`) and prints its figures."""

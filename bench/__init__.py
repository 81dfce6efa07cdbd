"""Benchmark suite: ``pytest bench --benchmark-only [--quick] [--results-dir DIR]``."""

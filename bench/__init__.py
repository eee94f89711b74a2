"""Benchmarks: each prints JSON and a table; ratios are measured side by side in one run."""

"""The benchmark code runs (tiny sizes); the real numbers come from `make bench`."""

from __future__ import annotations

import pytest

from bench import sampling


def test_sampling_benchmark_reports_every_concurrency_level():
    report = sampling.run(concurrency=[1, 2], max_tokens=3, prompt_length=4, base_model=None)
    assert [row["concurrent_requests"] for row in report["results"]] == [1, 2]
    for row in report["results"]:
        assert row["service_tokens_per_s"] > 0 and row["generate_loop_tokens_per_s"] > 0
        ratio = row["service_tokens_per_s"] / row["generate_loop_tokens_per_s"]
        assert row["speedup"] == pytest.approx(ratio, rel=0.05, abs=0.02)

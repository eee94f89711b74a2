"""The benchmark code runs (tiny sizes); the real numbers come from `make bench`.

Benchmarks stay out of the timed suite: those that start a server or processes of their own are
marked `bench` and run by `make bench-smoke` (the first thing `make bench` does; to run one by
name, add `-m bench`); `make test` runs the quick ones, and imports every benchmark so that none
falls behind the code it measures."""

from __future__ import annotations

import importlib
import pkgutil
from unittest import mock

import pytest
import torch

import bench
from bench import sampling


@pytest.mark.parametrize("name", [module.name for module in pkgutil.iter_modules(bench.__path__)])
def test_every_benchmark_imports(name):
    importlib.import_module(f"bench.{name}")


@pytest.mark.bench
def test_sampling_benchmark_compares_every_workload_with_a_static_batch():
    report = sampling.run(concurrency=[2], max_tokens=8, base_model=None, repeats=1)
    workloads = [(row["workload"], row["requests"]) for row in report["results"]]
    assert workloads == [("uniform", 2), ("mixed", 2), ("shared_prefix", 2)]
    for row in report["results"]:
        assert row["service_tokens_per_s"] > 0 and row["static_batch_tokens_per_s"] > 0
        ratio = row["service_tokens_per_s"] / row["static_batch_tokens_per_s"]
        assert row["vs_static_batch"] == pytest.approx(ratio, rel=0.05, abs=0.02)
        low, high = (float(end) for end in row["vs_static_batch_range"].split("-"))
        assert low == high == pytest.approx(ratio, abs=0.01)  # one run: its own ratio at both ends
        assert row["vs_static_base_model"] > 0 and row["engine_vs_static_batch"] > 0
        assert row["vs_one_at_a_time"] > 0


@pytest.mark.bench
def test_training_benchmark_reports_overhead_and_multi_tenant_gain():
    from bench import training

    report = training.run(None, rows=2, length=8, tenants=2, tenant_rows=1, tenant_length=8, steps=1, rank=4)
    overhead, gain = report["results"]
    assert overhead["ratio"] > 0 and overhead["service_ms_per_step"] > 0
    assert gain["gain"] > 0 and gain["torch_ceiling"] > 0 and gain["fraction_of_ceiling"] > 0


@pytest.mark.bench
def test_latency_benchmark_reports_percentiles_and_throughput():
    from bench import latency

    (result,) = latency.run(None, calls=5, burst=10)["results"]
    assert 0 < result["ack_p50_ms"] <= result["ack_p99_ms"] and result["acks_per_s_one_stream"] > 0


def test_wire_benchmark_counts_our_bytes_against_the_raw_tensors():
    from bench import wire

    for row in wire.run(rows=2, length=128)["results"]:
        # Our framing costs a little; int64 targets sent as int32 save more than that.
        assert 0.5 < row["ours_vs_raw"] < 1.0


def test_fused_norms_benchmark_compares_the_engine_with_its_norms_unfused():
    from bench import fused_norms

    with mock.patch.object(fused_norms, "Engine", wraps=fused_norms.Engine) as engines:
        (row,) = fused_norms.run(None, rows=[2], max_tokens=4, runs=1)["results"]
    fused, unfused = (call.args[0].model for call in engines.call_args_list)
    assert {type(module).__name__ for module in fused.modules()} >= {"FusedLlamaRMSNorm"}
    assert "FusedLlamaRMSNorm" not in {type(module).__name__ for module in unfused.modules()}
    assert row["speedup"] == pytest.approx(row["fused_tokens_per_s"] / row["hf_norms_tokens_per_s"], rel=0.05)


@pytest.mark.bench
def test_load_benchmark_counts_every_result_once():
    from bench import load

    (result,) = load.run(None, clients=2, seconds=1.0, rows=1, length=8)["results"]
    assert result["errors"] == 0 and result["steps_completed"] > 0 and result["every_ack_got_one_result"]


@pytest.mark.bench
def test_memory_benchmark_measures_both_systems_in_their_own_processes():
    from bench import memory

    (row,) = memory.run([(2, 16)], hidden=64, layers=1, vocab=512, rank=2, repeats=1)["results"]
    assert row["engine_peak_mb"] > 0 and row["peft_peak_mb"] > 0
    assert row["memory_ratio"] == pytest.approx(row["engine_peak_mb"] / row["peft_peak_mb"], rel=0.05)
    assert row["speed_ratio"] == pytest.approx(row["engine_tokens_per_s"] / row["peft_tokens_per_s"], rel=0.05)


@pytest.mark.bench
def test_rl_loop_benchmark_reports_growth_and_the_save_ratio():
    from bench import rl_loop

    (row,) = rl_loop.run(steps=3, warmup=1, rank=4, base_model=None)["results"]
    assert row["rss_mb"] > 0 and row["resident_adapter_mb"] > 0
    assert row["save_over_step"] == pytest.approx(row["save_ms"] / row["step_ms"], rel=0.05, abs=0.002)


def test_attention_benchmark_times_both_kernel_choices_at_new_and_seen_shapes():
    from bench import attention_shapes

    args = ["--rows", "4", "--heads", "2", "--head-dim", "8", "--start-length", "8", "--steps", "3"]
    results = attention_shapes.main(args)["results"]
    assert [(row["case"], row["kernels"]) for row in results] == [
        ("decode", "worker"),
        ("decode", "default"),
        ("training", "worker"),
        ("training", "default"),
    ]
    for row in results:
        assert row["new_shape_ms"] > 0 and row["seen_shape_ms"] > 0
        assert row["kernel"].startswith("aten::_scaled_dot_product")  # a fused kernel, named
        assert row["kernels"] == "default" or "cudnn" not in row["kernel"]


def test_the_benchmark_model_loads_as_a_base_model(tmp_path):
    from bench.make_model import write_model
    from tinker_server.worker.models import load_base_model

    parameters = write_model(str(tmp_path), hidden=256, layers=2, intermediate=512, vocab=300, dtype=torch.float32)
    loaded = load_base_model(str(tmp_path))
    assert sum(parameter.numel() for parameter in loaded.model.parameters()) == parameters
    assert loaded.model.config.num_key_value_heads == 1 and loaded.model.config.vocab_size == 300

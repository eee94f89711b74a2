"""The worker's engine, in process: one tenant's bad item never fails the others in its batch."""

from __future__ import annotations

import gc

import grpc
import numpy as np
import pytest
import torch

from tinker_server import ops
from tinker_server.worker.engine import Engine
from tinker_server.worker.models import load_base_model

SPEC = ops.LoraSpec(rank=4, seed=0, train_mlp=True, train_attn=True, train_unembed=True, alpha=32.0)
GREEDY = ops.SamplingConfig(4, 0.0, -1, 1.0, None, (), (), True)


@pytest.fixture(scope="module")
def engine() -> Engine:
    engine = Engine(load_base_model(None), torch.device("cpu"))
    (created,) = engine.run_cycle(ops.Cycle(1, [ops.WorkItem("c", "run-a", ops.CreateAdapter(SPEC))]))
    assert created.error is None
    return engine


def datum() -> ops.DatumArrays:
    tokens = np.arange(1, 9, dtype=np.int64)
    return ops.DatumArrays(tokens, {"target_tokens": tokens + 1})


def test_a_missing_adapter_fails_only_its_own_forward(engine):
    good = ops.WorkItem("g", "run-a", ops.ForwardBackward([datum()], "cross_entropy", {}, backward=False))
    ghost = ops.WorkItem("b", "run-ghost", ops.ForwardBackward([datum()], "cross_entropy", {}, backward=False))
    outcomes = engine.run_cycle(ops.Cycle(2, [good, ghost]))
    assert outcomes[0].error is None and outcomes[0].result.metrics["loss:sum"] > 0
    assert outcomes[1].error.code == grpc.StatusCode.NOT_FOUND.value[0] and "run-ghost" in outcomes[1].error.message


def test_a_vanished_sampler_checkpoint_fails_only_its_own_sample(engine, tmp_path):
    prompt = np.array([256, 72, 105], dtype=np.int64)
    base = ops.WorkItem("s", "", ops.Sample(None, None, prompt, 1, GREEDY, False, 0))
    gone = ops.WorkItem(
        "v", "", ops.Sample("tinker://x/sampler_weights/y", str(tmp_path / "gone"), prompt, 1, GREEDY, False, 0)
    )
    outcomes = engine.run_cycle(ops.Cycle(3, [base, gone]))
    assert outcomes[0].error is None and len(outcomes[0].result.sequences[0].tokens) == 4
    assert outcomes[1].error.code == grpc.StatusCode.NOT_FOUND.value[0]


def test_an_engine_without_a_spill_dir_removes_the_one_it_made():
    engine = Engine(load_base_model(None), torch.device("cpu"))
    spill_dir = engine.residency.spill_dir
    assert spill_dir.is_dir()
    del engine
    gc.collect()
    assert not spill_dir.exists()

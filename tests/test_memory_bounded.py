"""Memory-bounded passes (worker engine, in process): logits by chunks of positions, micro-batches
by a token budget, activation checkpointing, each against the plain full-logits computation;
a failed phase leaves every adapter's gradients as they were; the SDK splits batches by tokens."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

from tinker_client import types
from tinker_client._convert import chunk_data
from tinker_server import ops
from tinker_server.worker import passes
from tinker_server.worker.batching import length_buckets
from tinker_server.worker.engine import Engine
from tinker_server.worker.lora import RowSegment
from tinker_server.worker.passes import checkpoint_decoder_layers
from tinker_wire.tensor_codec import decode_array

from .engine_helpers import (
    VOCAB,
    batches,
    clear_gradients,
    engine_with_adapters,
    forward_backward,
    forward_items,
    gradients,
)


def full_logits_reference(engine: Engine, data: dict[str, list[ops.DatumArrays]]) -> list[list[np.ndarray]]:
    """The plain computation, one datum at a time through its own adapter: the model's whole
    float32 logits, log-softmax, the weighted cross-entropy, backward. Returns the logprobs."""
    logprobs = []
    for name, rows in data.items():
        logprobs.append([])
        for row in rows:
            with engine.routing.route([RowSegment(name, 0, 1)]):
                logits = engine.model(input_ids=torch.from_numpy(row.tokens)[None], use_cache=False).logits[0].float()
                targets = torch.from_numpy(row.loss_fn_inputs["target_tokens"])
                flat = targets.reshape(len(targets), -1)
                picked = torch.log_softmax(logits, dim=-1).gather(-1, flat).reshape(targets.shape)
                (-(picked * torch.from_numpy(row.loss_fn_inputs["weights"])).sum()).backward()
            logprobs[-1].append(picked.detach().numpy())
    return logprobs


def assert_same(actual: list[list[np.ndarray]], expected: list[list[np.ndarray]], tolerance: float) -> None:
    for actual_item, expected_item in zip(actual, expected, strict=True):
        for got, want in zip(actual_item, expected_item, strict=True):
            np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance)


def assert_close_to_scale(got: torch.Tensor, want: torch.Tensor, tolerance: float) -> None:
    """Close relative to the tensor's largest entry: LoRA gradients span orders of magnitude."""
    torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance * float(want.abs().max()))


def assert_same_gradients(actual: dict, expected: dict, tolerance: float) -> None:
    for name, grads in expected.items():
        for got, want in zip(actual[name], grads, strict=True):
            assert_close_to_scale(got, want, tolerance)


def record_passes(monkeypatch: pytest.MonkeyPatch, engine: Engine, fail_at: int | None = None) -> list[list[int]]:
    """The row lengths of every pass the engine runs, as it runs them; pass number `fail_at`
    raises instead of running."""
    passes_run: list[list[int]] = []
    run_pass = engine._forward_bucket

    def recorded(items, rows, outputs) -> None:
        passes_run.append([len(datum.tokens) for *_, datum in rows])
        if len(passes_run) == fail_at:
            raise RuntimeError("out of memory (simulated)")
        run_pass(items, rows, outputs)

    monkeypatch.setattr(engine, "_forward_bucket", recorded)
    return passes_run


def test_chunked_logits_and_micro_batches_equal_the_full_logits_computation(monkeypatch):
    """Chunks of 2-4 positions and passes of at most 64 padded tokens: the same logprobs and
    gradients as the whole float32 logits of one datum at a time, to float32 rounding."""
    engine = engine_with_adapters(max_tokens_per_pass=64)
    data = batches()
    monkeypatch.setattr(passes, "LOGITS_CHUNK_ELEMENTS", 4 * VOCAB)  # 4 positions of one row, 2 of two
    passes_run = record_passes(monkeypatch, engine)

    chunked = forward_backward(engine, data)
    chunked_gradients = gradients(engine)
    assert sorted(passes_run) == [[9], [22, 17], [30, 26]]  # longest first, <= 64 padded tokens each
    clear_gradients(engine)
    expected = full_logits_reference(engine, data)

    assert_same(chunked, expected, 1e-5)
    assert_same_gradients(chunked_gradients, gradients(engine), 1e-5)


def test_passes_stay_within_the_token_budget_but_a_longer_row_runs_alone():
    assert length_buckets([30, 100, 30, 5, 64], max_tokens=64) == [[1], [4], [0, 2], [3]]


def test_a_pass_takes_rows_of_any_length_while_within_its_unsplit_size():
    lengths = [40, 4, 40, 6, 5]
    assert length_buckets(lengths, max_tokens=1000) == [[0, 2], [3, 4, 1]]
    assert length_buckets(lengths, max_tokens=1000, min_tokens=160) == [[0, 2, 3, 4], [1]]
    assert length_buckets(lengths, max_tokens=120, min_tokens=1000) == [[0, 2, 3], [4, 1]]


def test_a_failed_pass_leaves_every_adapter_gradient_as_it_was(monkeypatch):
    engine = engine_with_adapters(("a", "b", "c"), max_tokens_per_pass=64)
    data = batches()
    forward_backward(engine, {"a": data["a"][:1]})  # a holds gradients; b and c none
    before = [grad.clone() for grad in gradients(engine)["a"]]
    phase = forward_items(data) + forward_items({"c": data["a"]}, backward=False)

    passes_run = record_passes(monkeypatch, engine, fail_at=2)
    outcomes = engine.run_cycle(ops.Cycle(2, phase))
    assert len(passes_run) == 2  # the first pass ran its backward
    assert [outcome.error.code for outcome in outcomes] == [grpc.StatusCode.INTERNAL.value[0]] * 3
    assert "out of memory (simulated)" in outcomes[0].error.message
    after = gradients(engine)
    assert all(torch.equal(got, want) for got, want in zip(after["a"], before, strict=True))
    assert all(grad is None for grad in after["b"] + after["c"])


def test_a_phase_adds_its_gradients_to_the_trained_adapters_only():
    """Forward-only rows share the passes (their adapter gets zeros from autograd): a forward
    leaves that adapter's gradients alone, and the trained ones get old + new."""
    engine = engine_with_adapters(("a", "c"), max_tokens_per_pass=64)
    data = batches()
    forward_backward(engine, {"a": data["a"][:1]})
    before = [grad.clone() for grad in gradients(engine)["a"]]
    phase = {"a": data["b"], "c": data["a"]}
    engine.run_cycle(ops.Cycle(2, forward_items({"a": phase["a"]}) + forward_items({"c": phase["c"]}, False)))
    accumulated = gradients(engine)
    assert all(grad is None for grad in accumulated["c"])
    clear_gradients(engine)
    forward_backward(engine, {"a": phase["a"]})
    for total, old, new in zip(accumulated["a"], before, gradients(engine)["a"], strict=True):
        assert_close_to_scale(total, old + new, 1e-5)


def test_activation_checkpointing_recomputes_each_layer_with_the_same_numbers(monkeypatch):
    data = batches()
    plain = engine_with_adapters()
    expected, expected_gradients = forward_backward(plain, data), gradients(plain)
    engine = engine_with_adapters()
    state = engine.model.state_dict()
    checkpoint_decoder_layers(engine.model)
    layer_calls = []
    engine.model.get_submodule("model.layers.1").register_forward_pre_hook(lambda *_: layer_calls.append(1))
    passes_run = record_passes(monkeypatch, engine)

    assert_same(forward_backward(engine, data), expected, 1e-6)
    assert_same_gradients(gradients(engine), expected_gradients, 1e-6)
    assert len(layer_calls) == 2 * len(passes_run) == 6  # once forward, once again in backward
    forward_backward(engine, data, backward=False)
    assert len(layer_calls) == 9  # without gradients: nothing to recompute
    assert not engine.model.training  # no dropout: the recomputation is the computation
    assert engine.model.state_dict().keys() == state.keys()  # adapters' module paths unchanged


def test_the_sdk_splits_a_batch_by_the_servers_tokens_per_request():
    data = [
        types.Datum(
            model_input=types.ModelInput.from_ints([7] * length), loss_fn_inputs={"target_tokens": [8] * length}
        )
        for length in (5, 4, 3, 6, 1)
    ]
    chunks = chunk_data(data, max_request_bytes=1 << 20, max_tokens=9)
    assert [[len(decode_array(datum.model_input.tokens)) for datum in chunk] for chunk in chunks] == [
        [5, 4],
        [3, 6],
        [1],
    ]
    assert len(chunk_data(data, max_request_bytes=1 << 20)) == 1  # no token limit given
    with pytest.raises(ValueError, match=r"data\[3\] has 6 tokens.*--max-batch-tokens"):
        chunk_data(data, max_request_bytes=1 << 20, max_tokens=5)

"""SDK types behave as the Tinker SDK's do."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tinker_client import types


def test_model_input_builds_and_reads_tokens():
    model_input = types.ModelInput.from_ints([5, 6]).append(types.EncodedTextChunk(tokens=[7])).append_int(8)
    assert model_input.to_ints() == [5, 6, 7, 8]
    assert model_input.length == 4
    assert types.ModelInput.empty().length == 0


def test_datum_converts_lists_numpy_and_torch():
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2]),
        loss_fn_inputs={
            "target_tokens": [2, 3],
            "weights": np.array([1.0, 0.5], dtype=np.float32),
            "advantages": torch.tensor([0.25, -1.0]),
        },
    )
    inputs = datum.loss_fn_inputs
    assert inputs["target_tokens"].dtype == "int64" and inputs["target_tokens"].tolist() == [2, 3]
    assert inputs["weights"].dtype == "float32" and inputs["weights"].shape == [2]
    assert inputs["advantages"].tolist() == [0.25, -1.0]


def test_tensor_data_holds_and_gives_copies_as_tinkers_does():
    """A loop refilling one buffer for datum after datum, or a custom loss scaling its weights
    in place, must not change what earlier datums hold."""
    buffer = np.zeros(3, dtype=np.float32)
    data = []
    for step in range(2):
        buffer[:] = step
        data.append(types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]), loss_fn_inputs={"weights": buffer}))
    assert [datum.loss_fn_inputs["weights"].tolist() for datum in data] == [[0.0] * 3, [1.0] * 3]
    weights = data[1].loss_fn_inputs["weights"]
    weights.to_torch().mul_(2)
    weights.to_numpy()[:] = 5
    assert weights.tolist() == [1.0] * 3
    from_torch = types.TensorData.from_torch(torch.ones(4, dtype=torch.int64))
    assert from_torch.dtype == "int64" and from_torch.shape == [4]
    assert types.TensorData.from_torch(torch.ones(2, dtype=torch.bfloat16)).dtype == "float32"


def test_tensor_data_from_list_needs_a_dtype():
    assert types.TensorData([1, 2, 3, 4], dtype="int64", shape=[2, 2]).shape == [2, 2]
    with pytest.raises(TypeError, match="dtype"):
        types.TensorData([1, 2])


def test_adam_params_defaults_follow_the_tinker_sdk():
    assert types.AdamParams() == types.AdamParams(
        learning_rate=1e-4, beta1=0.9, beta2=0.95, eps=1e-12, weight_decay=0.0, grad_clip_norm=0.0
    )


def test_model_input_keeps_numpy_tokens_as_arrays():
    tokens = np.arange(5, dtype=np.int32)
    model_input = types.ModelInput.from_ints(tokens).append_int(9)
    assert isinstance(model_input.chunks[0].tokens, np.ndarray)  # no per-token Python objects
    assert model_input.to_numpy().dtype == np.int64 and model_input.to_ints() == [0, 1, 2, 3, 4, 9]
    assert model_input.length == 6


def test_inputs_hold_copies_of_what_they_are_given():
    """As Tinker's models do: the cookbook's RL data processing builds each chunk from one buffer
    that it then clears and refills."""
    buffer, array = [1, 2, 3], np.arange(3)
    chunks = [types.EncodedTextChunk(tokens=buffer), types.EncodedTextChunk(tokens=array)]
    model_input = types.ModelInput(chunks=chunks)
    buffer.clear()
    array[:] = 7
    chunks.clear()
    assert model_input.to_ints() == [1, 2, 3, 0, 1, 2] and model_input.length == 6


def test_a_sparse_tensor_round_trips_through_csr_and_only_when_that_is_smaller():
    dense = torch.zeros(4, 50)
    dense[1, 7], dense[3, 0] = 2.5, -1.0
    sparse = types.TensorData.from_torch_sparse(dense)
    assert sparse.is_sparse and sparse.sparse_crow_indices == [0, 0, 1, 1, 2] and sparse.sparse_col_indices == [7, 0]
    assert torch.equal(sparse.to_torch(), dense)
    padded = types.TensorData.from_torch_sparse(torch.full((2, 30), -1, dtype=torch.int64), pad_value=-1)
    assert padded.is_sparse and padded.to_numpy(pad_value=-1).tolist() == [[-1] * 30] * 2
    assert not types.TensorData.from_torch_sparse(torch.ones(2, 3)).is_sparse  # denser as it is


def test_with_provenance_checks_that_the_spans_tile_their_fields():
    datum = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]), loss_fn_inputs={"target_tokens": [2, 3, 4]})
    spans = [
        types.PromptProvenanceSpan(sequence_id="s", length=2),
        types.SampledProvenanceSpan(sequence_id="s", length=1),
    ]
    tagged = datum.with_provenance(model_input=spans, loss_fn_inputs=spans)
    assert tagged.model_input_spans == spans and datum.model_input_spans is None
    with pytest.raises(ValueError, match="cover 2 positions but the field has 3"):
        datum.with_provenance(model_input=spans[:1], loss_fn_inputs=spans)
    with pytest.raises(ValueError, match="non-empty"):
        types.SampledProvenanceSpan(sequence_id="", length=1)
    with pytest.raises(ValueError, match="pair"):
        types.Datum(model_input=datum.model_input, model_input_spans=spans)


def test_sampled_sequences_read_as_lists_and_top_k_pairs():
    topk = types.TopkLogprobs(
        np.array([[5, 6], [7, 0]], np.int32), np.array([[-0.1, -2.0], [-0.5, -99999.0]], np.float32)
    )
    sequence = types.SampledSequence(
        "stop", "seq-1", np.array([5, 7], np.int32), np.array([-0.1, -0.5], np.float32), topk
    )
    assert sequence.tokens == [5, 7] and sequence.logprobs == pytest.approx([-0.1, -0.5])
    assert sequence.topk_logprobs == [[(5, pytest.approx(-0.1)), (6, -2.0)], [(7, -0.5)]]
    response = types.SampleResponse([sequence], prompt_logprobs_np=np.array([np.nan, -1.5], np.float32))
    assert response.prompt_logprobs == [None, -1.5] and response.prompt_cache_hit_tokens == 0


def test_model_input_with_an_image_has_a_length_but_no_token_list():
    image = types.ModelInput(chunks=[types.EncodedTextChunk(tokens=[1]), types.ImageChunk(b"png", "png", 16)])
    assert image.length == 17
    with pytest.raises(ValueError, match="EncodedTextChunk"):
        image.to_ints()


def test_values_are_coerced_and_what_cannot_be_is_refused():
    """As Tinker's models do; before, a temperature of None went out as 0 (greedy) and a token
    id of 1.5 was truncated on the wire (token ids are checked where they are converted anyway)."""
    stops = [1, np.int64(2)]
    params = types.SamplingParams(max_tokens=20.0, seed=np.int64(3), temperature=np.float32(0.5), stop=stops)
    stops.append(3)
    assert (params.max_tokens, params.seed, params.temperature, params.stop) == (20, 3, 0.5, [1, 2])
    assert type(params.max_tokens) is int and type(params.temperature) is float and type(params.stop[1]) is int
    with pytest.raises(TypeError, match="temperature: None is not a number"):
        types.SamplingParams(temperature=None)
    with pytest.raises(TypeError, match="max_tokens: 2.5 is not a whole number"):
        types.SamplingParams(max_tokens=2.5)
    mixed = types.ModelInput(chunks=[types.EncodedTextChunk(tokens=[np.int64(1), True, 2.0])])
    assert mixed.to_ints() == [1, 1, 2] and {type(token) for token in mixed.to_ints()} == {int}
    truncated = types.ModelInput(chunks=[types.EncodedTextChunk(tokens=[3, 1.5])])
    with pytest.raises(TypeError, match=r"EncodedTextChunk.tokens: token ids must be whole numbers.*1\.5"):
        truncated.to_numpy()  # (what sending it reads)


def test_integer_tensors_are_int64_and_every_array_is_the_callers_own():
    """Tinker holds integers as int64 (an int32 target in a custom loss fails torch's
    cross_entropy) and gives results as writable arrays, not views of the message's bytes."""
    tokens = types.TensorData.from_numpy(np.array([5, 6], np.int32))
    assert tokens.dtype == "int64" and tokens.to_torch().dtype == torch.int64
    read_only = np.frombuffer(np.array([-0.5, -1.0], np.float32).tobytes(), np.float32)
    array = types.TensorData.from_numpy(read_only).to_numpy()
    array *= 2
    assert array.tolist() == [-1.0, -2.0]

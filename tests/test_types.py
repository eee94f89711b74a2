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


def test_tensor_data_shares_memory_with_numpy_and_torch():
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    tensor_data = types.TensorData.from_numpy(array)
    assert np.shares_memory(tensor_data.to_numpy(), array)
    assert tensor_data.to_torch().data_ptr() == array.ctypes.data
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
    assert model_input.chunks[0].tokens is tokens  # no per-token Python objects
    assert model_input.to_numpy().dtype == np.int64 and model_input.to_ints() == [0, 1, 2, 3, 4, 9]
    assert model_input.length == 6

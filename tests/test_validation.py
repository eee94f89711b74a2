"""Bad input gets INVALID_ARGUMENT naming the field, and nobody else notices."""

from __future__ import annotations

import numpy as np
import pytest

from tinker_client import BadRequestError, types
from tinker_rpc.v1 import service_pb2, tensor_pb2, training_pb2
from tinker_wire.tensor_codec import encode_array

from .conftest import BASE_MODEL
from .helpers import RawSession, ragged_batch


def datum(tokens, **inputs) -> types.Datum:
    return types.Datum(model_input=types.ModelInput.from_ints(tokens), loss_fn_inputs=inputs)


GOOD_TARGETS = np.array([2, 3, 4], dtype=np.int64)
MALFORMED = {
    "mismatched lengths": (
        datum([1, 2, 3], target_tokens=np.array([2, 3], dtype=np.int64)),
        "cross_entropy",
        None,
        r"data\[0\]\.loss_fn_inputs\['target_tokens'\].*disagrees with model_input length 3",
    ),
    "token id out of range": (
        datum([1, 300, 3], target_tokens=GOOD_TARGETS),
        "cross_entropy",
        None,
        r"data\[0\]\.model_input\.tokens: token id 300 is out of range \[0, 259\)",
    ),
    "negative target token": (
        datum([1, 2, 3], target_tokens=np.array([2, -1, 4], dtype=np.int64)),
        "cross_entropy",
        None,
        r"loss_fn_inputs\['target_tokens'\]: token id -1",
    ),
    "wrong dtype": (
        datum([1, 2, 3], target_tokens=GOOD_TARGETS, weights=np.array([1, 1, 1], dtype=np.int64)),
        "cross_entropy",
        None,
        r"loss_fn_inputs\['weights'\]: dtype int32; expected float32",
    ),
    "float targets": (
        datum([1, 2, 3], target_tokens=np.array([2.0, 3.0, 4.0], dtype=np.float32)),
        "cross_entropy",
        None,
        r"loss_fn_inputs\['target_tokens'\]: dtype float32; expected int32 or int64",
    ),
    "NaN weight": (
        datum([1, 2, 3], target_tokens=GOOD_TARGETS, weights=np.array([1, np.nan, 1], dtype=np.float32)),
        "cross_entropy",
        None,
        r"loss_fn_inputs\['weights'\]: contains NaN",
    ),
    "unknown input key": (
        datum([1, 2, 3], target_tokens=GOOD_TARGETS, advantages=np.ones(3, dtype=np.float32)),
        "cross_entropy",
        None,
        r"loss_fn_inputs: unknown key\(s\) \['advantages'\] for cross_entropy",
    ),
    "missing input key": (
        datum([1, 2, 3], weights=np.ones(3, dtype=np.float32)),
        "cross_entropy",
        None,
        r"loss_fn_inputs: missing key\(s\) \['target_tokens'\]",
    ),
    "unknown config key": (
        datum([1, 2, 3], target_tokens=GOOD_TARGETS),
        "cross_entropy",
        {"temperature": 2.0},
        r"loss_fn_config: unknown key\(s\) \['temperature'\]",
    ),
    "unknown loss": (
        datum([1, 2, 3], target_tokens=GOOD_TARGETS),
        "mse",
        None,
        r"loss_fn: unknown loss 'mse'",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_datum_is_rejected_by_name_while_another_client_trains(service, case):
    bystander = service.create_lora_training_client(BASE_MODEL, rank=4, seed=9).result()
    bystander_data = ragged_batch(seed=3, lengths=[8])
    expected_loss = bystander.forward(bystander_data, "cross_entropy").result().metrics["loss:sum"]
    offender = service.create_lora_training_client(BASE_MODEL, rank=4, seed=9).result()
    bad_datum, loss_fn, config, message = MALFORMED[case]

    in_flight = bystander.forward_backward(bystander_data, "cross_entropy")
    with pytest.raises(BadRequestError, match=message) as raised:
        offender.forward_backward([bad_datum], loss_fn, config).result(timeout=60)
    assert raised.value.request_id

    assert in_flight.result(timeout=60).metrics["loss:sum"] == pytest.approx(expected_loss, rel=1e-6)
    # The offender's run is intact too: a good request still works.
    assert offender.forward(bystander_data, "cross_entropy").result(timeout=60).metrics["loss:sum"] == pytest.approx(
        expected_loss, rel=1e-5
    )


def test_bad_optimizer_settings_are_rejected_by_name(service):
    training = service.create_lora_training_client(BASE_MODEL, rank=4, seed=1).result()
    with pytest.raises(BadRequestError, match=r"adam_params\.learning_rate: -0\.1"):
        training.optim_step(types.AdamParams(learning_rate=-0.1)).result(timeout=30)
    with pytest.raises(BadRequestError, match=r"adam_params\.beta2: 1\.0"):
        training.optim_step(types.AdamParams(beta2=1.0)).result(timeout=30)


def test_a_tensor_whose_shape_lies_about_its_bytes_is_rejected(server, service):
    training = service.create_lora_training_client(BASE_MODEL, rank=4, seed=1).result()
    lying = tensor_pb2.TensorData(dtype=tensor_pb2.D_TYPE_INT64, shape=[10], data=b"\x00" * 8)
    request = service_pb2.SessionRequest(
        request_id="liar",
        model_id=training.model_id,
        forward=training_pb2.ForwardBackwardInput(
            loss_fn="cross_entropy",
            data=[
                training_pb2.Datum(
                    model_input=training_pb2.ModelInput(tokens=lying),
                    loss_fn_inputs={"target_tokens": encode_array(np.zeros(10, dtype=np.int64))},
                )
            ],
        ),
    )
    session = RawSession(server.address)
    try:
        session.send(request)
        response = session.receive()
    finally:
        session.close()
    assert response.result.error.code == 3  # INVALID_ARGUMENT
    assert "model_input.tokens: shape [10] of int64 needs 80 bytes, data has 8" in response.result.error.message

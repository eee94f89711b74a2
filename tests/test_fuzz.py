"""Hostile input: whatever a client sends, it gets a clear error status, and neither the
server nor the worker goes down."""

from __future__ import annotations

import math
import re

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinker_rpc.v1 import sampling_pb2, service_pb2, tensor_pb2, training_pb2
from tinker_wire.tensor_codec import encode_array

from .conftest import BASE_MODEL
from .helpers import RawSession, ragged_batch

# Statuses a request may legitimately end with; INTERNAL or UNKNOWN would mean a bug.
EXPECTED = {0, 3, 5, 6, 8, 9}
"""OK and the clear refusals; never UNAVAILABLE (a worker that died) or INTERNAL."""

names = st.text(max_size=40) | st.sampled_from(["../../etc/passwd", "a/b", ".", "..", "\x00", "ok-name", "x" * 200])
floats = st.floats(allow_nan=True, allow_infinity=True, width=64)
weird_shapes = st.lists(st.integers(min_value=-3, max_value=1 << 40), max_size=3)


@st.composite
def tensors(draw) -> tensor_pb2.TensorData:
    if draw(st.booleans()):  # well-formed, but maybe the wrong dtype or hostile values
        kind = draw(st.sampled_from(["int64", "int32", "float32"]))
        length = draw(st.integers(min_value=0, max_value=12))
        if kind == "float32":
            values = draw(
                st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=length, max_size=length)
            )
        else:
            values = draw(st.lists(st.integers(-(1 << 31), (1 << 31) - 1), min_size=length, max_size=length))
        return encode_array(np.asarray(values, dtype=kind))
    return tensor_pb2.TensorData(  # lying shapes, unknown dtypes, truncated bytes
        dtype=draw(st.integers(min_value=-2, max_value=9)), shape=draw(weird_shapes), data=draw(st.binary(max_size=48))
    )


@st.composite
def requests(draw, model_id: str) -> service_pb2.SessionRequest:
    target = draw(st.sampled_from([model_id, "", "run-nope", "../x"]))
    request = service_pb2.SessionRequest(request_id="fuzz", model_id=target)
    kind = draw(st.sampled_from(["forward", "forward_backward", "optim", "save", "load", "sample", "create"]))
    if kind in ("forward", "forward_backward"):
        datum = training_pb2.Datum(
            model_input=training_pb2.ModelInput(tokens=draw(tensors())),
            loss_fn_inputs=draw(
                st.dictionaries(
                    st.sampled_from(["target_tokens", "weights", "advantages", "logprobs", "??"]), tensors(), max_size=3
                )
            ),
        )
        body = training_pb2.ForwardBackwardInput(
            data=[datum] * draw(st.integers(0, 2)),
            loss_fn=draw(st.sampled_from(["cross_entropy", "ppo", "gspo", "nope", ""])),
            loss_fn_config=draw(
                st.dictionaries(st.sampled_from(["beta", "clip_low_threshold", "x"]), floats, max_size=2)
            ),
        )
        getattr(request, kind).CopyFrom(body)
    elif kind == "optim":
        values = [draw(floats) for _ in range(6)]
        request.optim_step.adam_params.CopyFrom(
            training_pb2.AdamParams(
                learning_rate=values[0],
                beta1=values[1],
                beta2=values[2],
                eps=values[3],
                weight_decay=values[4],
                grad_clip_norm=values[5],
            )
        )
    elif kind == "save":
        request.save_state.name = draw(names)
        if draw(st.booleans()):
            request.save_state.ttl_seconds = draw(st.integers(-(1 << 62), 1 << 62))
    elif kind == "load":
        request.load_state.path = draw(
            st.sampled_from(["tinker://", f"tinker://{model_id}/weights/../../x", "tinker://a/b/c/d"]) | names
        )
    elif kind == "sample":
        request.sample.CopyFrom(
            sampling_pb2.SampleRequest(
                base_model=BASE_MODEL,
                prompt=training_pb2.ModelInput(tokens=draw(tensors())),
                num_samples=draw(st.integers(-2, 1 << 20)),
                sampling_params=sampling_pb2.SamplingParams(
                    max_tokens=draw(st.integers(-5, 1 << 30)),
                    temperature=draw(floats),
                    top_p=draw(floats),
                    top_k=draw(st.integers(-(1 << 31), (1 << 31) - 1)),
                    stop_strings=draw(st.lists(st.text(max_size=3), max_size=2)),
                ),
                topk_prompt_logprobs=draw(st.integers(-1, 1 << 20)),
            )
        )
    else:
        request.create_model.CopyFrom(
            training_pb2.CreateModelRequest(
                base_model=draw(st.sampled_from([BASE_MODEL, "", "other"])),
                lora_config=training_pb2.LoraConfig(
                    rank=draw(st.integers(-(1 << 31), (1 << 31) - 1)), train_attn=draw(st.booleans())
                ),
            )
        )
    return request


@pytest.fixture(scope="module")
def target_run(service):
    return service.create_lora_training_client(BASE_MODEL, rank=4, seed=1).result()


def worker_pid(server) -> list[str]:
    """Every worker the server started: a restart after a crash adds one."""
    return re.findall(r"worker pid (\d+)", (server.data_dir / "server.log").read_text())


@pytest.fixture(scope="module")
def first_worker(server) -> list[str]:
    return worker_pid(server)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_hostile_requests_get_clear_errors_and_break_nothing(server, target_run, first_worker, data):
    request = data.draw(requests(target_run.model_id))
    session = RawSession(server.address)
    try:
        session.send(request)
        response = session.receive()
        if response.HasField("ack"):  # valid by chance: it must still finish cleanly
            response = session.receive()
    finally:
        session.close()
    error = response.result.error
    assert error.code in EXPECTED, (error.code, error.message)
    if error.code:
        assert error.message and len(error.message) < 2000
    assert worker_pid(server) == first_worker, (request, error.message)  # the worker never died


def test_truncated_and_garbage_messages_do_not_hurt_the_server(server, service, target_run):
    pids = worker_pid(server)
    valid = service_pb2.SessionRequest(
        request_id="t",
        model_id=target_run.model_id,
        forward=training_pb2.ForwardBackwardInput(loss_fn="cross_entropy"),
    ).SerializeToString()
    channel = grpc.insecure_channel(server.address)
    session = channel.stream_stream(
        "/tinker_rpc.v1.TinkerService/Session",
        request_serializer=lambda raw: raw,
        response_deserializer=lambda raw: raw,
    )
    for garbage in (valid[: len(valid) // 2], b"\xff" * 64, b"\x0a\xff\xff\xff\xff\x0f"):
        try:
            replies = [service_pb2.SessionResponse.FromString(raw) for raw in session(iter([garbage]), timeout=10)]
        except grpc.RpcError as error:  # undecodable: gRPC ends that stream, and only that stream
            assert error.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT), error
        else:  # decodable after all: then it is an invalid request like any other
            assert replies and all(reply.result.error.code == 3 for reply in replies), replies
    channel.close()
    data = ragged_batch(seed=90, lengths=[5])
    assert math.isfinite(target_run.forward(data, "cross_entropy").result(timeout=60).metrics["loss:sum"])
    assert worker_pid(server) == pids  # the worker never crashed

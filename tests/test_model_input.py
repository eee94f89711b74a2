"""A ModelInput is one token tensor or Tinker's list of chunks, for datums and prompts alike:
token chunks mean their concatenation; image chunks are refused by name (the model reads text)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from tinker_rpc.v1 import sampling_pb2, training_pb2
from tinker_server.worker.models import EMBEDDED_MODEL_NAME
from tinker_wire.tensor_codec import decode_array, encode_array

from .helpers import RawSession, create_run

TOKENS = [256, 72, 105, 33, 32, 104]
INVALID_ARGUMENT = 3


@pytest.fixture(scope="module")
def session(server) -> Iterator[RawSession]:
    session = RawSession(server.address)
    yield session
    session.close()


@pytest.fixture(scope="module")
def model_id(session) -> str:
    return create_run(session)


def tokens(ids: list[int]) -> training_pb2.ModelInput:
    return training_pb2.ModelInput(tokens=encode_array(np.array(ids, dtype=np.int64)))


def chunks(*parts: list[int] | training_pb2.ModelInputChunk) -> training_pb2.ModelInput:
    """Token lists become token chunks; chunks are kept as they are."""
    return training_pb2.ModelInput(
        chunks=[
            part
            if isinstance(part, training_pb2.ModelInputChunk)
            else training_pb2.ModelInputChunk(tokens=encode_array(np.array(part, dtype=np.int32)))
            for part in parts
        ]
    )


def forward_backward(model_id: str, model_input: training_pb2.ModelInput) -> dict[str, Any]:
    targets = encode_array(np.array(TOKENS[1:] + [111]))
    datum = training_pb2.Datum(model_input=model_input, loss_fn_inputs={"target_tokens": targets})
    request = training_pb2.ForwardBackwardInput(loss_fn="cross_entropy", data=[datum])
    return {"model_id": model_id, "forward_backward": request}


def greedy_sample(prompt: training_pb2.ModelInput) -> dict[str, Any]:
    params = sampling_pb2.SamplingParams(max_tokens=4, temperature=0.0, top_p=1.0)
    request = sampling_pb2.SampleRequest(
        base_model=EMBEDDED_MODEL_NAME,
        prompt=prompt,
        num_samples=1,
        sampling_params=params,
        include_prompt_logprobs=True,
    )
    return {"sample": request}


def test_token_chunks_mean_their_concatenation(session, model_id):
    split = chunks(TOKENS[:2], [], TOKENS[2:])
    plain, chunked = (session.call(**forward_backward(model_id, given)) for given in (tokens(TOKENS), split))
    np.testing.assert_array_equal(
        decode_array(chunked.forward_backward.loss_fn_outputs[0].tensors["logprobs"]),
        decode_array(plain.forward_backward.loss_fn_outputs[0].tensors["logprobs"]),
    )
    plain, chunked = (session.call(**greedy_sample(given)).sample for given in (tokens(TOKENS), split))
    np.testing.assert_array_equal(decode_array(chunked.sequences[0].tokens), decode_array(plain.sequences[0].tokens))
    np.testing.assert_array_equal(decode_array(chunked.prompt_logprobs), decode_array(plain.prompt_logprobs))


IMAGE = training_pb2.ModelInputChunk(image=training_pb2.ImageChunk(data=b"\x89PNG\r\n\x1a\n", format="png"))
IMAGE_POINTER = training_pb2.ModelInputChunk(
    image_asset_pointer=training_pb2.ImageAssetPointerChunk(location="https://example.com/a.png", format="png")
)
BOTH = training_pb2.ModelInput(tokens=encode_array(np.array(TOKENS)), chunks=[IMAGE])
REJECTED = {
    "image chunk in a datum": (
        lambda model_id: forward_backward(model_id, chunks(TOKENS, IMAGE)),
        r"^forward_backward\.data\[0\]\.model_input\.chunks\[1\]: an image chunk, but embedded/tiny-llama takes "
        r"text only",
    ),
    "image pointer in a prompt": (
        lambda _: greedy_sample(chunks(IMAGE_POINTER, TOKENS)),
        r"^sample\.prompt\.chunks\[0\]: an image_asset_pointer chunk, but embedded/tiny-llama takes text only",
    ),
    "tokens and chunks": (
        lambda model_id: forward_backward(model_id, BOTH),
        r"^forward_backward\.data\[0\]\.model_input: set exactly one of tokens or chunks",
    ),
    "neither": (lambda _: greedy_sample(training_pb2.ModelInput()), r"^sample\.prompt: set exactly one of"),
    "empty chunk": (
        lambda model_id: forward_backward(model_id, chunks(TOKENS, training_pb2.ModelInputChunk())),
        r"^forward_backward\.data\[0\]\.model_input\.chunks\[1\]: empty chunk",
    ),
    "no tokens at all": (lambda _: greedy_sample(chunks([], [])), r"^sample\.prompt\.chunks: 0 tokens; expected 1 to"),
    "token out of range": (
        lambda _: greedy_sample(chunks(TOKENS, [7, 300])),
        r"^sample\.prompt\.chunks\[1\]\.tokens: token id 300 is out of range",
    ),
}


@pytest.mark.parametrize("case", sorted(REJECTED))
def test_a_bad_model_input_is_rejected_by_name(session, model_id, case):
    build, message = REJECTED[case]
    result = session.call(**build(model_id))
    assert result.error.code == INVALID_ARGUMENT
    assert re.search(message, result.error.message), result.error.message

"""Provenance spans are checked against what the sampler recorded, and stable_reinforce's
request checks: each violation is INVALID_ARGUMENT naming the datum, the list and the span."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from tinker_rpc.v1 import sampling_pb2, service_pb2, training_pb2
from tinker_wire.tensor_codec import decode_array, encode_array

from .helpers import RawSession, create_run, provenance_datum, record_sample

PROMPT = [256, 72, 105, 33, 32]
INVALID_ARGUMENT = 3


@dataclass
class Recorded:
    session: RawSession
    model_id: str
    sequence: sampling_pb2.SampledSequence

    def datum(self, loss_fn: str = "stable_reinforce") -> training_pb2.Datum:
        """A datum whose spans hold, with the inputs `loss_fn` takes."""
        if loss_fn == "cross_entropy":
            return provenance_datum(PROMPT, self.sequence)
        length = len(PROMPT) + len(decode_array(self.sequence.tokens)) - 1
        return provenance_datum(PROMPT, self.sequence, advantages=np.ones(length, np.float32))

    def forward_backward(
        self, data: list[training_pb2.Datum], loss_fn: str = "stable_reinforce", **options
    ) -> service_pb2.Result:
        request = training_pb2.ForwardBackwardInput(loss_fn=loss_fn, data=data, **options)
        return self.session.call(model_id=self.model_id, forward_backward=request)

    def rejection(self, bad: training_pb2.Datum, loss_fn: str = "stable_reinforce", **options) -> str:
        """The error message of a batch whose second datum is `bad`."""
        result = self.forward_backward([self.datum(loss_fn), bad], loss_fn, **options)
        assert result.error.code == INVALID_ARGUMENT, result
        return result.error.message


@pytest.fixture(scope="module")
def recorded(server) -> Iterator[Recorded]:
    session = RawSession(server.address)
    sample = record_sample(session, PROMPT, num_samples=1, seed=0)
    assert len(decode_array(sample.sequences[0].tokens)) >= 3  # room for the mutations below
    yield Recorded(session, create_run(session), sample.sequences[0])
    session.close()


def set_tokens(datum: training_pb2.Datum, key: str | None, position: int, token: int) -> None:
    """Replaces one token of the model input (key None) or of a loss input."""
    tensor = datum.model_input.tokens if key is None else datum.loss_fn_inputs[key]
    tokens = decode_array(tensor).copy()
    tokens[position] = token
    tensor.CopyFrom(encode_array(tokens))


P = len(PROMPT)
Mutation = Callable[[training_pb2.Datum], None]
BROKEN_SPANS: dict[str, tuple[Mutation, str]] = {
    "only model_input_spans": (
        lambda d: d.ClearField("loss_fn_input_spans"),
        r"data\[1\]\.loss_fn_input_spans: missing; set it together with model_input_spans",
    ),
    "only loss_fn_input_spans": (
        lambda d: d.ClearField("model_input_spans"),
        r"data\[1\]\.model_input_spans: missing; set it together with loss_fn_input_spans",
    ),
    "model_input_spans do not tile the input": (
        lambda d: setattr(d.model_input_spans[0], "length", P - 1),
        r"data\[1\]\.model_input_spans: span lengths sum to \d+, but model_input has \d+",
    ),
    "loss_fn_input_spans do not tile the targets": (
        lambda d: setattr(d.loss_fn_input_spans[1], "length", 1),
        r"data\[1\]\.loss_fn_input_spans: span lengths sum to \d+, but target_tokens has \d+",
    ),
    "unknown source": (
        lambda d: setattr(d.model_input_spans[1], "source", training_pb2.PROVENANCE_SOURCE_UNSPECIFIED),
        r"data\[1\]\.model_input_spans\[1\]\.source: 0 is neither PROVENANCE_SOURCE_PROMPT",
    ),
    "empty sequence_id": (
        lambda d: setattr(d.loss_fn_input_spans[1], "sequence_id", ""),
        r"data\[1\]\.loss_fn_input_spans\[1\]\.sequence_id: empty",
    ),
    "negative offset": (
        lambda d: setattr(d.model_input_spans[0], "offset", -1),
        r"data\[1\]\.model_input_spans\[0\]\.offset: -1; must be >= 0",
    ),
    "negative length": (
        lambda d: setattr(d.loss_fn_input_spans[0], "length", -1),
        r"data\[1\]\.loss_fn_input_spans\[0\]\.length: -1; must be >= 0",
    ),
    "unknown sequence": (
        lambda d: setattr(d.loss_fn_input_spans[1], "sequence_id", "seq-" + "0" * 24),
        r"data\[1\]\.loss_fn_input_spans\[1\]\.sequence_id: no recorded sequence 'seq-0{24}'",
    ),
    "run past the recorded prompt": (
        lambda d: setattr(d.model_input_spans[0], "offset", 1),
        rf"data\[1\]\.model_input_spans\[0\]: offset 1 \+ length {P} runs past the end of sequence seq-\w+'s "
        rf"prompt \({P} tokens\)",
    ),
    "run past the sampled tokens": (
        lambda d: setattr(d.loss_fn_input_spans[1], "offset", 1),
        r"data\[1\]\.loss_fn_input_spans\[1\]: offset 1 \+ length \d+ runs past the end of sequence seq-\w+'s "
        r"sampled tokens",
    ),
    "input differs from the recorded prompt": (
        lambda d: set_tokens(d, None, 2, 0),
        r"data\[1\]\.model_input_spans\[0\]: tokens \[0, 33, 32\] differ from sequence seq-\w+'s prompt "
        r"\[105, 33, 32\] at offset 2",
    ),
    "input differs from the recorded sampled tokens": (
        lambda d: set_tokens(d, None, P, 258),
        r"data\[1\]\.model_input_spans\[1\]: tokens \[258, .*\] differ from sequence seq-\w+'s sampled tokens "
        r"\[\d+, .*\] at offset 0",
    ),
    "target differs from the recorded sampled tokens": (
        lambda d: set_tokens(d, "target_tokens", P, 258),
        r"data\[1\]\.loss_fn_input_spans\[1\]: tokens \[258.*\] differ from sequence seq-\w+'s sampled tokens "
        r"\[\d+.*\] at offset 1",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN_SPANS))
def test_a_span_that_does_not_hold_is_rejected_by_name(recorded, case):
    mutate, message = BROKEN_SPANS[case]
    bad = recorded.datum()
    mutate(bad)
    assert_matches(recorded.rejection(bad), message)


def assert_matches(message: str, pattern: str) -> None:
    assert re.search(pattern, message), f"{message!r} does not match {pattern!r}"


def test_losses_that_do_not_read_spans_leave_them_alone(recorded):
    """As Tinker's do: the cookbook's RL trainer attaches spans to every datum, for any loss,
    whether or not its sequences were sampled with record_stability_info (and so recorded)."""
    bare = recorded.datum("cross_entropy")
    bare.ClearField("model_input_spans")
    bare.ClearField("loss_fn_input_spans")
    unrecorded = recorded.datum("cross_entropy")
    for span in [*unrecorded.model_input_spans, *unrecorded.loss_fn_input_spans]:
        span.sequence_id = "seq-never-sampled"
    top_k = recorded.datum("cross_entropy")  # [N, K] targets, which spans cannot tile
    targets = decode_array(top_k.loss_fn_inputs["target_tokens"])
    top_k.loss_fn_inputs["target_tokens"].CopyFrom(encode_array(np.stack([targets, targets], axis=1)))
    losses = []
    for datum in (bare, unrecorded, top_k):
        request = training_pb2.ForwardBackwardInput(loss_fn="cross_entropy", data=[datum])
        result = recorded.session.call(model_id=recorded.model_id, forward=request)
        assert not result.HasField("error"), result.error.message
        losses.append(result.forward_backward.metrics["loss:sum"])
    assert losses[0] == losses[1] and losses[2] == pytest.approx(2 * losses[0])


def test_a_datum_whose_spans_hold_is_accepted_and_its_use_keeps_the_record(recorded, server):
    """Targets under PROMPT spans are not compared (the cookbook pads them with 0); the
    forward_backward refreshes the record's last_used."""
    database = sqlite3.connect(server.data_dir / "tinker.db")
    query = "SELECT last_used FROM sampled_sequences WHERE sequence_id = ?"
    (before,) = database.execute(query, (recorded.sequence.sequence_id,)).fetchone()
    result = recorded.forward_backward([recorded.datum()])
    assert not result.HasField("error"), result.error.message
    (after,) = database.execute(query, (recorded.sequence.sequence_id,)).fetchone()
    database.close()
    assert after > before


def test_stable_reinforce_needs_provenance(recorded):
    bad = recorded.datum()
    bad.ClearField("model_input_spans")
    bad.ClearField("loss_fn_input_spans")
    message = recorded.rejection(bad)
    assert "data[1]: stable_reinforce needs provenance" in message
    assert "record_stability_info=True" in message


def test_only_sequences_sampled_with_record_stability_info_are_recorded(recorded):
    request = sampling_pb2.SampleRequest(
        base_model="embedded/tiny-llama",
        prompt=training_pb2.ModelInput(tokens=encode_array(np.array(PROMPT))),
        num_samples=1,
        sampling_params=sampling_pb2.SamplingParams(max_tokens=4, temperature=1.0, top_p=1.0, seed=0),
    )
    unrecorded = recorded.session.call(sample=request).sample.sequences[0]
    length = len(PROMPT) + len(decode_array(unrecorded.tokens)) - 1
    bad = provenance_datum(PROMPT, unrecorded, advantages=np.ones(length, np.float32))
    assert f"data[1].model_input_spans[0].sequence_id: no recorded sequence {unrecorded.sequence_id!r}" in (
        recorded.rejection(bad)
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"loss_fn_config": {"max_importance_weight": 0.0}},
            r"loss_fn_config\['max_importance_weight'\]: 0.0; must be > 0",
        ),
        ({"loss_fn_config": {"kl_coeff": -0.1}}, r"loss_fn_config\['kl_coeff'\]: -0.1; must be >= 0"),
        (
            {"loss_fn_config": {"clip_low_threshold": 0.8}},
            r"unknown key\(s\) \['clip_low_threshold'\] for stable_reinforce",
        ),
        (
            {"loss_fn_config_strings": {"mode": "token"}},
            r"forward_backward\.loss_fn_config_strings\['mode'\]: stable_reinforce takes no text values; .*"
            r"\['kl_coeff', 'max_importance_weight'\]",
        ),
    ],
    ids=["cap", "kl_coeff", "unknown key", "text value"],
)
def test_stable_reinforce_config_is_checked(recorded, options, message):
    assert_matches(recorded.rejection(recorded.datum(), **options), message)


def test_text_config_values_are_rejected_for_every_loss(recorded):
    message = recorded.rejection(recorded.datum("cross_entropy"), "cross_entropy", loss_fn_config_strings={"w": "x"})
    assert "forward_backward.loss_fn_config_strings['w']: cross_entropy takes no text values" in message


def test_a_datum_naming_an_expired_record_is_told_it_expired(recorded, server):
    sample = record_sample(recorded.session, PROMPT, num_samples=1, seed=5)
    expiring = Recorded(recorded.session, recorded.model_id, sample.sequences[0])
    database = sqlite3.connect(server.data_dir / "tinker.db")
    with database:  # what the sweep does a day after the record's last use
        database.execute(
            "INSERT INTO expired_sequences SELECT sequence_id, owner, 0 FROM sampled_sequences WHERE sequence_id = ?",
            (expiring.sequence.sequence_id,),
        )
        database.execute("DELETE FROM sampled_sequences WHERE sequence_id = ?", (expiring.sequence.sequence_id,))
    database.close()
    result = expiring.forward_backward([expiring.datum()])
    assert result.error.code == 9  # FAILED_PRECONDITION: the request is right, the record is gone
    assert f"the record of sequence {expiring.sequence.sequence_id!r} expired" in result.error.message

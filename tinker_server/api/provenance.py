"""Provenance spans: which recorded sampled sequence each run of a datum's positions reproduces.

A sample taken with record_stability_info records, per sequence and for the caller's owner,
its prompt, its sampled tokens and the sampler's logprobs of them. A datum with provenance
tiles its input and its loss rows with runs of those; every run is checked against the
record here, and the recorded logprobs go to the losses that need them (stable_reinforce),
so the server never relies on the client's copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tinker_rpc.v1 import training_pb2
from tinker_server.loss_specs import RECORDED_LOGPROBS, SAMPLED_MASK
from tinker_server.store import RecordedSequence, Store

SEQUENCE_TTL_SECONDS = 24 * 3600.0
"""A record is kept this long after its last use: being recorded, or named by a forward_backward."""

_PROMPT, _SAMPLED = training_pb2.PROVENANCE_SOURCE_PROMPT, training_pb2.PROVENANCE_SOURCE_SAMPLED
_PREVIEW_TOKENS = 8


class SpanError(ValueError):
    """A span that does not hold; the message names the field. `expired`: it names a sequence
    whose record expired (FAILED_PRECONDITION, not a malformed request)."""

    def __init__(self, message: str, expired: bool = False) -> None:
        super().__init__(message)
        self.expired = expired


@dataclass
class DatumProvenance:
    """Per loss position, float32 [N]: the sampler's recorded logprob under SAMPLED spans (0
    elsewhere), and 1 under SAMPLED spans, 0 under PROMPT spans."""

    sampler_logprobs: np.ndarray
    sampled_mask: np.ndarray

    def loss_inputs(self) -> dict[str, np.ndarray]:
        return {RECORDED_LOGPROBS: self.sampler_logprobs, SAMPLED_MASK: self.sampled_mask}


@dataclass(frozen=True)
class _Run:
    """One span, resolved: the positions it covers in the datum and in its recorded sequence."""

    field: str
    sequence: RecordedSequence
    sampled: bool
    positions: slice
    recorded: slice

    @property
    def source_name(self) -> str:
        return "sampled tokens" if self.sampled else "prompt"

    @property
    def recorded_tokens(self) -> np.ndarray:
        return (self.sequence.tokens if self.sampled else self.sequence.prompt)[self.recorded]


class SpanChecker:
    """Checks the spans of one request's datums against its owner's records, and remembers
    which records they named (their use refreshes them)."""

    def __init__(self, store: Store, owner: str, now: float) -> None:
        self._store = store
        self._owner = owner
        self._used_since = now - SEQUENCE_TTL_SECONDS
        self._found: dict[str, RecordedSequence | None] = {}

    @property
    def used(self) -> frozenset[str]:
        return frozenset(sequence_id for sequence_id, found in self._found.items() if found is not None)

    def check(
        self, field: str, datum: training_pb2.Datum, tokens: np.ndarray, targets: np.ndarray
    ) -> DatumProvenance | None:
        """The datum's provenance, or None when it has no spans; raises SpanError."""
        input_spans, loss_spans = datum.model_input_spans, datum.loss_fn_input_spans
        if not input_spans and not loss_spans:
            return None
        if not input_spans or not loss_spans:
            lists = ("model_input_spans", "loss_fn_input_spans")
            missing, given = lists if loss_spans else lists[::-1]
            raise SpanError(f"{field}.{missing}: missing; set it together with {given} (or neither)")
        if targets.ndim != 1:
            raise SpanError(
                f"{field}.loss_fn_inputs['target_tokens']: shape {list(targets.shape)}; provenance needs [N]"
            )
        for run in self._runs(f"{field}.model_input_spans", input_spans, "model_input", len(tokens)):
            _compare(run, tokens[run.positions])
        provenance = DatumProvenance(np.zeros(len(targets), np.float32), np.zeros(len(targets), np.float32))
        for run in self._runs(f"{field}.loss_fn_input_spans", loss_spans, "target_tokens", len(targets)):
            # Targets under PROMPT spans carry no sampler logprob and are not compared: the
            # tinker-cookbook's rl_loop pads them with 0.
            if run.sampled:
                _compare(run, targets[run.positions])
                provenance.sampler_logprobs[run.positions] = run.sequence.logprobs[run.recorded]
                provenance.sampled_mask[run.positions] = 1.0
        return provenance

    def _runs(self, field: str, spans: Sequence[training_pb2.ProvenanceSpan], tiled: str, length: int) -> list[_Run]:
        """The spans of one list, checked one by one and for tiling `length` positions of `tiled`."""
        for index, span in enumerate(spans):
            _check_span(f"{field}[{index}]", span)
        total = sum(span.length for span in spans)
        if total != length:
            raise SpanError(
                f"{field}: span lengths sum to {total}, but {tiled} has {length} tokens; the spans must tile it"
            )
        runs, position = [], 0
        for index, span in enumerate(spans):
            span_field = f"{field}[{index}]"
            run = _Run(
                span_field,
                self._sequence(span_field, span.sequence_id),
                span.source == _SAMPLED,
                slice(position, position + span.length),
                slice(span.offset, span.offset + span.length),
            )
            recorded_length = len(run.sequence.tokens if run.sampled else run.sequence.prompt)
            if span.offset + span.length > recorded_length:
                raise SpanError(
                    f"{span_field}: offset {span.offset} + length {span.length} runs past the end of sequence "
                    f"{span.sequence_id}'s {run.source_name} ({recorded_length} tokens)"
                )
            runs.append(run)
            position += span.length
        return runs

    def _sequence(self, field: str, sequence_id: str) -> RecordedSequence:
        """The owner's unexpired record; another owner's is as unknown."""
        if sequence_id not in self._found:
            self._found[sequence_id] = self._store.sampled_sequence(sequence_id, self._owner, self._used_since)
        found = self._found[sequence_id]
        if found is None and self._store.sequence_expired(sequence_id, self._owner):
            raise SpanError(
                f"{field}.sequence_id: the record of sequence {sequence_id!r} expired (unused for a day, or "
                "beyond your records' limit); sample again with record_stability_info=True",
                expired=True,
            )
        if found is None:
            raise SpanError(
                f"{field}.sequence_id: no recorded sequence {sequence_id!r} (unknown, unused for a day, or not "
                "sampled with record_stability_info=True)"
            )
        return found


def _check_span(field: str, span: training_pb2.ProvenanceSpan) -> None:
    if span.source not in (_PROMPT, _SAMPLED):
        raise SpanError(
            f"{field}.source: {span.source} is neither PROVENANCE_SOURCE_PROMPT ({_PROMPT}) "
            f"nor PROVENANCE_SOURCE_SAMPLED ({_SAMPLED})"
        )
    if not span.sequence_id:
        raise SpanError(f"{field}.sequence_id: empty; name a SampledSequence.sequence_id")
    if span.offset < 0:
        raise SpanError(f"{field}.offset: {span.offset}; must be >= 0")
    if span.length < 0:
        raise SpanError(f"{field}.length: {span.length}; must be >= 0")


def _compare(run: _Run, given: np.ndarray) -> None:
    """The datum's tokens under a run must be the recorded ones."""
    expected = run.recorded_tokens
    differ = np.flatnonzero(given != expected)
    if differ.size:
        first = int(differ[0])
        raise SpanError(
            f"{run.field}: tokens {_preview(given[first:])} differ from sequence {run.sequence.sequence_id}'s "
            f"{run.source_name} {_preview(expected[first:])} at offset {run.recorded.start + first}"
        )


def _preview(tokens: np.ndarray) -> str:
    shown = ", ".join(str(int(token)) for token in tokens[:_PREVIEW_TOKENS])
    return f"[{shown}, ...]" if len(tokens) > _PREVIEW_TOKENS else f"[{shown}]"

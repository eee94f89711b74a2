"""The generations under way on one base model: sample requests admitted within the KV cache
budget, joined into as few batches as the budget allows, and stepped until they finish.

Requests wait, in order, while what running generations reserve (and the weights copies requests
read) leaves no room for theirs; rows that finish give their room back at once. A batch takes
another generation's rows only where the joined batch still fits (its rows share one column
layout, so all reserve the longest remaining).
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from tinker_server import ops
from tinker_server.worker.kv_cache import KvBudget, kv_bytes_per_token, reuses_prompts
from tinker_server.worker.sampling import Generation, SamplingModel

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Request:
    """A sample request and the weights it reads: the name they are routed by, whether that is
    a copy made for it (dropped once nothing reads it), and what its prompts are kept and found
    under (None: the weights may change, nothing is reused)."""

    item: ops.WorkItem
    weights: str | None
    copy: bool
    reuse_key: str | None

    @property
    def sample(self) -> ops.Sample:
        return self.item.operation


class Decoder:
    """Admits, batches and steps generations. `release` is called with the name of a weights
    copy once no request reads it any more."""

    def __init__(self, sampler: SamplingModel, kv_cache_bytes: int, release: Callable[[str], None]) -> None:
        self._sampler, self._release = sampler, release
        self.max_uninterrupted_seconds = 0.25
        """The longest a cycle decodes while nothing waits for the next one (it then answers
        anyway: the server's housekeeping runs between cycles)."""
        self.budget = KvBudget(kv_cache_bytes, kv_bytes_per_token(sampler.model, sampler.routing, sampler.device))
        self._prefixes = self.budget.prefixes if reuses_prompts(sampler.model.config) else None
        self._generations: list[Generation] = []
        self._waiting: deque[_Request] = deque()
        self._readers: Counter[str] = Counter()
        """Requests (waiting or generating) per weights copy."""
        self._copy_bytes: dict[str, int] = {}
        """What each weights copy holds: it counts against the budget until its last reader is answered."""
        self._stepped = False
        """Whether the last decode stepped the generations (see `decode`'s `answering`)."""

    def too_large(self, request: ops.Sample) -> str | None:
        """Why the request could never run within the budget, even alone; None if it can."""
        needed = self._needed_bytes([request])
        if needed <= self.budget.total_bytes:
            return None
        return (
            f"num_samples={request.num_samples} rows of {len(request.prompt)} prompt tokens + max_tokens="
            f"{request.params.max_tokens} need {needed / 2**20:.1f} MiB of KV cache; this server's budget "
            f"(--kv-cache-bytes) is {self.budget.total_bytes / 2**20:.1f} MiB: ask for fewer samples or tokens"
        )

    def submit(self, item: ops.WorkItem, weights: str | None, copy_bytes: int, reuse_key: str | None) -> None:
        """Queues a sample; it starts at the first step there is room for it (see `_Request`).
        `copy_bytes`: what the weights copy made for it holds (0: it reads weights that stay)."""
        if copy_bytes:
            self._readers[weights] += 1
            self._copy_bytes[weights] = copy_bytes
        self._waiting.append(_Request(item, weights, bool(copy_bytes), reuse_key))

    @property
    def batches(self) -> int:
        """Generations decoding apart (each one forward per step)."""
        return len(self._generations)

    @property
    def rows(self) -> int:
        """Rows in the generations' caches (finished ones yet to leave included)."""
        return sum(generation.batch_rows for generation in self._generations)

    @property
    def reserved_bytes(self) -> int:
        """What the generations reserve, and the weights copies requests read."""
        return sum(generation.reserved_bytes for generation in self._generations) + sum(self._copy_bytes.values())

    def forget_prompts(self, reuse_key: str) -> None:
        """The weights kept under `reuse_key` changed or left: their prompts are no longer theirs."""
        self.budget.prefixes.forget(reuse_key)

    def decode(
        self,
        cycle_id: int,
        seconds: float | None,
        interrupt: Callable[[], bool] | None = None,
        answering: bool = False,
    ) -> list[ops.Outcome]:
        """Steps the generations (admitting and joining waiting requests first), at least once,
        then on for up to `seconds` (None: until all are done); the outcomes of the requests whose
        rows all finished, or that failed. With `interrupt` (whether requests wait for the next
        cycle), it stops as soon as one does, and otherwise goes on past `seconds` until some
        outcome is ready to answer (at most `max_uninterrupted_seconds`): no cycle ends, and costs
        a round trip, for nothing. `answering`: the cycle has outcomes of its own waiting for its
        end (training results), so it never goes past `seconds`; and if the generations stepped in
        the last decode, it does not step them at all: those outcomes wait for the step under way
        when they arrived, not for one more. The generations step again in the next cycle (every
        other cycle while each brings outcomes of its own)."""
        if answering and self._stepped and self._generations:
            self._stepped = False
            return []
        start = time.monotonic()
        outcomes = self._admit(cycle_id)
        self._stepped = bool(self._generations)
        while self._generations:
            self._join()
            for generation in list(self._generations):
                try:
                    generation.step()
                    finished = generation.take_finished()
                except Exception as error:  # a bug must fail its requests, not the worker
                    log.exception("cycle %d: a generation failed", cycle_id)
                    finished = [(request, _internal_error(error)) for request in generation.unanswered()]
                    self._generations.remove(generation)
                outcomes.extend(self._answer(request, output, cycle_id) for request, output in finished)
                if generation.done and generation in self._generations:
                    self._generations.remove(generation)
            outcomes.extend(self._admit(cycle_id))
            answers = answering or bool(outcomes)
            if seconds is not None and self._chunk_ends(time.monotonic() - start, seconds, interrupt, answers):
                break
        return outcomes

    def _chunk_ends(self, elapsed: float, seconds: float, interrupt: Callable[[], bool] | None, answers: bool) -> bool:
        if interrupt is None:
            return elapsed >= seconds
        if interrupt():
            return True
        return elapsed >= seconds and (answers or elapsed >= self.max_uninterrupted_seconds)

    def _admit(self, cycle_id: int) -> list[ops.Outcome]:
        """Prefills, as one generation, the waiting requests that fit beside what is reserved, in
        order (the first always does when nothing runs); a failed prefill answers at once."""
        admitted: list[_Request] = []
        reserved = self.reserved_bytes
        while self._waiting:
            needed = self._needed_bytes([request.sample for request in (*admitted, self._waiting[0])])
            if (self._generations or admitted) and not self.budget.make_room(needed, reserved):
                break
            admitted.append(self._waiting.popleft())
        if not admitted:
            return []
        try:
            self._generations.append(self._prefill(admitted))
        except Exception as error:
            log.exception("cycle %d: a prefill failed", cycle_id)
            return [self._answer(request, _internal_error(error), cycle_id) for request in admitted]
        finally:
            self.budget.prefixes.shrink_to(self.budget.total_bytes - self.reserved_bytes)
        return []

    def _needed_bytes(self, samples: list[ops.Sample]) -> int:
        """What a generation of `samples` reserves: every row, room for the longest prompt and output."""
        positions = max(len(sample.prompt) for sample in samples) + max(sample.params.max_tokens for sample in samples)
        return self.budget.rows_bytes(sum(sample.num_samples for sample in samples), positions)

    def _prefill(self, requests: list[_Request]) -> Generation:
        return Generation(
            self._sampler,
            [request.sample for request in requests],
            [request.weights for request in requests],
            requests,
            self._prefixes,
            {request.weights: request.reuse_key for request in requests if request.reuse_key is not None},
        )

    def _join(self) -> None:
        """One batch where the caches and the budget allow it: fewer, larger forward passes."""
        if len(self._generations) < 2:
            return
        reserved = self.reserved_bytes
        first, *others = self._generations
        self._generations = [first]
        for other in others:
            joined = self.budget.rows_bytes(first.batch_rows + other.batch_rows, first.joined_positions(other))
            growth = joined - first.reserved_bytes - other.reserved_bytes
            if first.can_absorb(other) and self.budget.make_room(growth, reserved):
                first.absorb(other)
                reserved += growth
            else:
                self._generations.append(other)

    def _answer(self, request: _Request, output: ops.OpResult | ops.OpError, cycle_id: int) -> ops.Outcome:
        """The request's outcome; a weights copy nothing reads any more is released."""
        if request.copy:
            self._readers[request.weights] -= 1
            if not self._readers[request.weights]:
                del self._readers[request.weights], self._copy_bytes[request.weights]
                self._release(request.weights)
        outcome = ops.Outcome(request.item.future_id, cycle_id)
        if isinstance(output, ops.OpError):
            outcome.error = output
        else:
            outcome.result = output
        return outcome


def _internal_error(error: Exception) -> ops.OpError:
    return ops.OpError(grpc.StatusCode.INTERNAL.value[0], f"internal error in sampling: {error}")

"""Per-model queues in submission order, drained in clock cycles onto the worker.

Each queue key (a model_id, or a sampler) has its own `seq` counter. A cycle takes from
every queue the longest prefix whose operations fit the cycle's phase order (creation,
forward/backward, optimizer step, snapshot, sampling), so a model's requests run in
`seq` order while different models share each cycle's batches.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc

from tinker_server import metrics, ops
from tinker_server.worker.platform import NO_SIGNAL, WorkSignal

log = logging.getLogger(__name__)

# Phases whose operations batch together: several of one model may share a cycle.
_BATCHABLE = {ops.Phase.FORWARD, ops.Phase.SAVE, ops.Phase.SAMPLE}


@dataclass
class Ticket:
    """What the submitter gets back: the request's future_id and the outcome to await."""

    future_id: str
    outcome: asyncio.Future[ops.Outcome]


DEFAULT_COALESCE_SECONDS = 0.02
DEFAULT_MAX_CYCLE_TOKENS = 32768
SAMPLE_BURST_GAP_SECONDS = 0.005
"""A generation about to start waits (within the coalescing window) until sample requests stop
arriving for this long: a burst of them, an RL step's prompts, is prefilled as one batch instead of
as its first request, then the others joining it step by step. (At 2 ms, 3 of 10 bursts of 32
requests from one client on a busy 2-core machine split after their second request, costing ~50 ms
of a ~1.1 s generation; at 5 ms none did.)"""


def operation_tokens(operation: ops.Operation) -> int:
    """What an operation costs a cycle, in tokens through the model."""
    if isinstance(operation, ops.ForwardBackward):
        return sum(len(datum.tokens) for datum in operation.data)
    if isinstance(operation, ops.Sample):
        return operation.num_samples * (len(operation.prompt) + operation.params.max_tokens)
    return 0


@dataclass(frozen=True)
class CyclePolicy:
    """`continuous[:COALESCE]`: a cycle starts as soon as the worker is free and work is
    queued. Right after a cycle it waits up to COALESCE seconds (default 20 ms) for the
    models that were just served to send their next request, so tenants that train in
    lock-step share one batch instead of splitting into groups that alternate; and a cycle
    that starts a generation waits, as long at most, for a burst of samples to end (see
    SAMPLE_BURST_GAP_SECONDS).
    `fixed:PERIOD`: cycles start on a fixed grid of PERIOD seconds (like the hosted service):
    everything that arrives between two ticks shares the next cycle."""

    period: float | None = None
    coalesce: float = DEFAULT_COALESCE_SECONDS

    @classmethod
    def parse(cls, text: str) -> CyclePolicy:
        kind, _, seconds = text.partition(":")
        try:
            value = float(seconds) if seconds else None
        except ValueError:
            value = -1.0
        if kind == "continuous" and (value is None or value >= 0):
            return cls(coalesce=DEFAULT_COALESCE_SECONDS if value is None else value)
        if kind == "fixed" and value is not None and value > 0:
            return cls(period=value)
        raise ValueError(
            f"--cycle {text!r}: expected 'continuous', 'continuous:COALESCE_SECONDS' (>= 0) or 'fixed:SECONDS' (> 0)"
        )

    def __str__(self) -> str:
        return f"continuous:{self.coalesce:g}" if self.period is None else f"fixed:{self.period:g}"


@dataclass
class _Queued:
    queue_key: str
    ticket: Ticket
    item: ops.WorkItem


RunCycle = Callable[[ops.Cycle], Awaitable[list[ops.Outcome]]]
Gate = Callable[[list[ops.WorkItem]], list[ops.OpError | None]]
"""Which of a cycle's items may run (None), in order; the others fail with the error given."""


def admit_all(items: list[ops.WorkItem]) -> list[ops.OpError | None]:
    return [None] * len(items)


class Scheduler:
    def __init__(
        self,
        run_cycle: RunCycle,
        policy: CyclePolicy,
        max_cycle_tokens: int = DEFAULT_MAX_CYCLE_TOKENS,
        work_waiting: WorkSignal = NO_SIGNAL,
    ) -> None:
        self._run_cycle = run_cycle
        self._work_waiting = work_waiting
        """Tells a worker generating across cycles that requests wait for its next one."""
        self.gate: Gate = admit_all
        self._policy = policy
        self._max_cycle_tokens = max_cycle_tokens
        self._queues: dict[str, deque[_Queued]] = {}
        self._queued = 0  # kept apart: the metrics thread reads it while the loop changes the queues
        self._work_available = asyncio.Event()
        self._submitted = asyncio.Event()  # pulses on every submission
        self._cycle_ids = itertools.count(1)
        self._fair_start = 0
        self._running_cycle = False
        self._held: set[str] = set()
        self._closed = False
        self._tick_requested = False
        self._sent: dict[str, _Queued] = {}
        """Sent to the worker and not answered yet: samples whose generation runs on over later cycles."""

    def submit(self, queue_key: str, item: ops.WorkItem, first: bool = False) -> Ticket:
        """Queues an operation; its order among `queue_key`'s requests is fixed now (its seq, for a
        client's request, is the dispatcher's). `first`: ahead of everything queued for the key (what
        brings a run onto this replica, before the requests that moved with it)."""
        item.future_id = item.future_id or uuid.uuid4().hex
        ticket = Ticket(item.future_id, asyncio.get_running_loop().create_future())
        queue = self._queues.setdefault(queue_key, deque())
        queued = _Queued(queue_key, ticket, item)
        queue.appendleft(queued) if first else queue.append(queued)
        self._queued += 1
        self._work_available.set()
        self._work_waiting.set()
        self._submitted.set()
        return ticket

    # -- runs moving between replicas (each replica has its own scheduler) -----------

    def hold(self, run: str) -> None:
        """The run's requests wait here (it is moving in) until `release`."""
        self._held.add(run)

    def release(self, run: str) -> None:
        self._held.discard(run)
        self._work_available.set()
        self._work_waiting.set()

    def take(self, run: str | None = None) -> list[_Queued]:
        """Removes every queued request whose home is `run` (None: every one), in order."""
        taken = []
        for key, queue in list(self._queues.items()):
            kept = deque()
            for queued in queue:
                (taken if run is None or ops.home_run(queued.item) == run else kept).append(queued)
            if kept:
                self._queues[key] = kept
            else:
                del self._queues[key]
        self._queued -= len(taken)
        return taken

    def put_back(self, taken: list[_Queued]) -> None:
        """Queues requests another scheduler took, ahead of this one's for the same keys, in their order."""
        for queued in reversed(taken):
            self._queues.setdefault(queued.queue_key, deque()).appendleft(queued)
        self._queued += len(taken)
        if taken:
            self._work_available.set()

    def answering(self) -> bool:
        """A cycle runs, or samples sent to the worker are still generating."""
        return self._running_cycle or bool(self._sent)

    def tick(self) -> None:
        """Runs a cycle soon even if nothing is queued: between cycles the worker moves idle
        adapters off its device. (Never a cycle beside the scheduler's: its outcomes, samples
        finishing included, are the scheduler's to answer.)"""
        self._tick_requested = True
        self._work_available.set()
        self._work_waiting.set()

    def close(self) -> None:
        """Stops the clock after the running cycle (its replica retired)."""
        self._closed = True
        self._work_available.set()

    def queued(self) -> int:
        """Requests waiting for a cycle; safe to call from any thread."""
        return self._queued

    async def run(self) -> None:
        """The clock: forms and runs cycles until cancelled."""
        loop = asyncio.get_running_loop()
        clock_start = loop.time()
        just_served: set[str] = set()
        while not self._closed:
            if self._policy.period is None and just_served and not self._sent:
                await self._await_returning(just_served, loop.time() + self._policy.coalesce)
            if not self._sent:  # else the worker is still generating: the next cycle goes on with it
                await self._work_available.wait()
            if self._closed:
                return
            if self._policy.period is not None and not (self._sent and not self._queues):
                # Ticks on a fixed grid: whatever arrives between two ticks shares a cycle.
                period = self._policy.period
                next_tick = clock_start + (math.floor((loop.time() - clock_start) / period) + 1) * period
                await asyncio.sleep(next_tick - loop.time())
            else:
                await asyncio.sleep(0)  # let requests already received join, e.g. an optim_step sent with its backward
                if not self._sent and self._sample_queued():
                    await self._await_burst_end(loop.time() + self._policy.coalesce)
            self._work_waiting.clear()  # (before the take: what is queued after it sets it again)
            batch = self._take_cycle()
            just_served = {queued.queue_key for queued in batch}
            if not batch or not any(self._queues.values()):
                self._work_available.clear()  # (what is left is held: `release` wakes the clock)
            if batch or self._sent or self._tick_requested:
                self._tick_requested = False
                log.debug(
                    "cycle of %d requests: %s",
                    len(batch),
                    " ".join(f"{q.queue_key[-4:]}:{type(q.item.operation).__name__[:3]}" for q in batch),
                )
                await self._execute(ops.Cycle(next(self._cycle_ids), [queued.item for queued in batch]), batch)

    async def _await_returning(self, models: set[str], deadline: float) -> None:
        """Waits until every model in `models` has queued work again, or the deadline."""
        loop = asyncio.get_running_loop()
        while not models <= self._queues.keys() and (remaining := deadline - loop.time()) > 0:
            self._submitted.clear()
            try:
                await asyncio.wait_for(self._submitted.wait(), remaining)
            except TimeoutError:
                return

    def _sample_queued(self) -> bool:
        return any(isinstance(queued.item.operation, ops.Sample) for queue in self._queues.values() for queued in queue)

    async def _await_burst_end(self, deadline: float) -> None:
        """Waits until no request has been submitted for SAMPLE_BURST_GAP_SECONDS, or the deadline."""
        loop = asyncio.get_running_loop()
        while (remaining := deadline - loop.time()) > 0:
            self._submitted.clear()
            try:
                await asyncio.wait_for(self._submitted.wait(), min(SAMPLE_BURST_GAP_SECONDS, remaining))
            except TimeoutError:
                return

    def _take_cycle(self) -> list[_Queued]:
        """Round-robin over the queues, one request at a time, so a tenant with a long queue
        cannot crowd out one with a single request; each queue contributes a prefix whose
        phases fit the cycle's order, and the cycle stops at `max_cycle_tokens` (a single
        request larger than that still runs, alone)."""
        keys = list(self._queues)
        if not keys:
            return []
        self._fair_start = (self._fair_start + 1) % len(keys)
        order = keys[self._fair_start :] + keys[: self._fair_start]
        taken: list[_Queued] = []
        budget = self._max_cycle_tokens
        last_phase: dict[str, ops.Phase] = {}
        progress = True
        while progress:
            progress = False
            for key in order:
                queue = self._queues[key]
                if not queue or ops.home_run(queue[0].item) in self._held:
                    continue
                operation = queue[0].item.operation
                previous = last_phase.get(key)
                if previous is not None and (
                    operation.phase < previous or (operation.phase == previous and operation.phase not in _BATCHABLE)
                ):
                    continue
                cost = operation_tokens(operation)
                if taken and cost > budget:
                    continue
                taken.append(queue.popleft())
                budget -= cost
                last_phase[key] = operation.phase
                progress = True
        for key in keys:
            if not self._queues[key]:
                del self._queues[key]
        self._queued -= len(taken)
        return taken

    async def drain(self, timeout: float) -> None:
        """Waits, up to `timeout`, until every queued request has run; fails those left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (self._queues or self._running_cycle or self._sent) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        code = grpc.StatusCode.UNAVAILABLE.value[0]
        message = f"the server shut down before this request ran (it waited {timeout:g}s)"
        for queued in [queued for queue in self._queues.values() for queued in queue] + list(self._sent.values()):
            if not queued.ticket.outcome.done():
                outcome = ops.Outcome(queued.item.future_id, 0, error=ops.OpError(code, message))
                queued.ticket.outcome.set_result(outcome)
        self._queues.clear()
        self._sent.clear()
        self._queued = 0

    async def _run_admitted(self, cycle: ops.Cycle) -> list[ops.Outcome]:
        """Runs the items the gate lets through (none, for a cycle that only lets the worker go
        on generating or settle its adapters); the others fail with its error."""
        refusals = self.gate(cycle.items)
        admitted = [item for item, refusal in zip(cycle.items, refusals, strict=True) if refusal is None]
        refused = [
            ops.Outcome(item.future_id, cycle.cycle_id, error=refusal)
            for item, refusal in zip(cycle.items, refusals, strict=True)
            if refusal is not None
        ]
        return refused + await self._run_cycle(ops.Cycle(cycle.cycle_id, admitted))

    async def _execute(self, cycle: ops.Cycle, batch: list[_Queued]) -> None:
        self._running_cycle = True
        self._sent.update((queued.item.future_id, queued) for queued in batch)
        started = asyncio.get_running_loop().time()
        try:
            outcomes = await self._run_admitted(cycle)
        except Exception as error:  # the worker died or the pipe broke: fail this cycle only
            log.error("cycle %d failed: %s", cycle.cycle_id, error)
            message = f"the worker failed while running this request: {error}"
            failed = ops.OpError(grpc.StatusCode.UNAVAILABLE.value[0], message)
            outcomes = [ops.Outcome(future_id, cycle.cycle_id, error=failed) for future_id in self._sent]
        finally:
            self._running_cycle = False
            metrics.CYCLE_SECONDS.observe(asyncio.get_running_loop().time() - started)
            metrics.CYCLE_REQUESTS.observe(len(cycle.items))
            metrics.TOKENS.inc(sum(operation_tokens(item.operation) for item in cycle.items))
        for outcome in outcomes:
            queued = self._sent.pop(outcome.future_id, None)
            if queued is not None and not queued.ticket.outcome.done():
                queued.ticket.outcome.set_result(outcome)

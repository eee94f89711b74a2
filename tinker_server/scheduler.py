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
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc

from tinker_server import ops

log = logging.getLogger(__name__)

# Phases whose operations batch together: several of one model may share a cycle.
_BATCHABLE = {ops.Phase.FORWARD, ops.Phase.SAVE, ops.Phase.SAMPLE}


@dataclass
class Ticket:
    """What the submitter gets back: the ack's fields and the outcome to await."""

    future_id: str
    seq: int
    outcome: asyncio.Future[ops.Outcome]


@dataclass(frozen=True)
class CyclePolicy:
    """`continuous`: a cycle starts as soon as the worker is free and work is queued.
    `fixed`: a cycle starts every `period` seconds (like the hosted service)."""

    period: float | None = None

    @classmethod
    def parse(cls, text: str) -> CyclePolicy:
        if text == "continuous":
            return cls()
        kind, _, seconds = text.partition(":")
        if kind == "fixed":
            try:
                period = float(seconds)
            except ValueError:
                period = -1.0
            if period > 0:
                return cls(period)
        raise ValueError(f"--cycle {text!r}: expected 'continuous' or 'fixed:SECONDS' with SECONDS > 0")

    def __str__(self) -> str:
        return "continuous" if self.period is None else f"fixed:{self.period:g}"


@dataclass
class _Queued:
    ticket: Ticket
    item: ops.WorkItem


RunCycle = Callable[[ops.Cycle], Awaitable[list[ops.Outcome]]]


class Scheduler:
    def __init__(self, run_cycle: RunCycle, policy: CyclePolicy) -> None:
        self._run_cycle = run_cycle
        self._policy = policy
        self._queues: dict[str, deque[_Queued]] = {}
        self._seqs: dict[str, itertools.count[int]] = {}
        self._work_available = asyncio.Event()
        self._cycle_ids = itertools.count(1)
        self._fair_start = 0

    def submit(self, queue_key: str, item: ops.WorkItem) -> Ticket:
        """Queues an operation; its order among `queue_key`'s requests is fixed now."""
        seq = next(self._seqs.setdefault(queue_key, itertools.count(1)))
        future_id = uuid.uuid4().hex
        item.future_id = future_id
        ticket = Ticket(future_id, seq, asyncio.get_running_loop().create_future())
        self._queues.setdefault(queue_key, deque()).append(_Queued(ticket, item))
        self._work_available.set()
        return ticket

    def queued(self) -> int:
        return sum(len(queue) for queue in self._queues.values())

    async def run(self) -> None:
        """The clock: forms and runs cycles until cancelled."""
        loop = asyncio.get_running_loop()
        next_tick = loop.time()
        while True:
            await self._work_available.wait()
            if self._policy.period is not None:
                next_tick = max(next_tick + self._policy.period, loop.time())
                await asyncio.sleep(next_tick - loop.time())
            batch = self._take_cycle()
            if not any(self._queues.values()):
                self._work_available.clear()
            if batch:
                await self._execute(ops.Cycle(next(self._cycle_ids), [queued.item for queued in batch]), batch)

    def _take_cycle(self) -> list[_Queued]:
        """Every queue's longest phase-ordered prefix; queues visited round-robin."""
        keys = list(self._queues)
        if not keys:
            return []
        self._fair_start = (self._fair_start + 1) % len(keys)
        taken: list[_Queued] = []
        for key in keys[self._fair_start :] + keys[: self._fair_start]:
            queue = self._queues[key]
            last_phase: ops.Phase | None = None
            while queue:
                phase = queue[0].item.operation.phase
                if last_phase is not None and (phase < last_phase or (phase == last_phase and phase not in _BATCHABLE)):
                    break
                taken.append(queue.popleft())
                last_phase = phase
            if not queue:
                del self._queues[key]
        return taken

    async def _execute(self, cycle: ops.Cycle, batch: list[_Queued]) -> None:
        try:
            outcomes = await self._run_cycle(cycle)
        except Exception as error:  # the worker died or the pipe broke: fail this cycle only
            log.error("cycle %d failed: %s", cycle.cycle_id, error)
            message = f"the worker failed while running this request: {error}"
            code = grpc.StatusCode.UNAVAILABLE.value[0]
            outcomes = [
                ops.Outcome(item.future_id, cycle.cycle_id, error=ops.OpError(code, message)) for item in cycle.items
            ]
        for queued, outcome in zip(batch, outcomes, strict=True):
            if not queued.ticket.outcome.done():
                queued.ticket.outcome.set_result(outcome)

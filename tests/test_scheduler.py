"""Cycle formation: per-model order by phase, tenants batched together, both clock policies."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tinker_server import ops
from tinker_server.scheduler import DEFAULT_COALESCE_SECONDS, SAMPLE_BURST_GAP_SECONDS, CyclePolicy, Scheduler

ADAM = ops.AdamConfig(1e-3, 0.9, 0.95, 1e-12, 0.0, 0.0)


def forward(model_id: str, tokens: int = 2) -> ops.WorkItem:
    datum = ops.DatumArrays(np.zeros(tokens, dtype=np.int64), {"target_tokens": np.zeros(tokens, dtype=np.int64)})
    return ops.WorkItem("", model_id, ops.ForwardBackward([datum], "cross_entropy", {}, backward=True))


def step(model_id: str) -> ops.WorkItem:
    return ops.WorkItem("", model_id, ops.OptimStep(ADAM))


class RecordingWorker:
    def __init__(self, delay: float = 0.0) -> None:
        self.cycles: list[list[tuple[str, str]]] = []
        self.delay = delay

    async def run_cycle(self, cycle: ops.Cycle) -> list[ops.Outcome]:
        await asyncio.sleep(self.delay)
        self.cycles.append([(item.model_id, type(item.operation).__name__) for item in cycle.items])
        return [ops.Outcome(item.future_id, cycle.cycle_id, result=ops.OptimStepResult({})) for item in cycle.items]


def per_model(cycle: list[tuple[str, str]]) -> dict[str, list[str]]:
    """A cycle's operations per model, in order (models themselves are visited round-robin)."""
    grouped: dict[str, list[str]] = {}
    for model_id, operation in cycle:
        grouped.setdefault(model_id, []).append(operation)
    return grouped


async def run_all(scheduler: Scheduler, submissions: list[tuple[str, ops.WorkItem]]) -> list[ops.Outcome]:
    clock = asyncio.create_task(scheduler.run())
    tickets = [scheduler.submit(key, item) for key, item in submissions]
    try:
        return await asyncio.wait_for(asyncio.gather(*(ticket.outcome for ticket in tickets)), 10)
    finally:
        clock.cancel()


def test_a_model_never_runs_a_request_before_an_earlier_one():
    """fb, step, fb, fb, step: the second step waits for the next cycle, the fbs batch."""
    worker = RecordingWorker()
    scheduler = Scheduler(worker.run_cycle, CyclePolicy())
    items = [forward("a"), step("a"), forward("a"), forward("a"), step("a"), forward("b")]
    outcomes = asyncio.run(run_all(scheduler, [(item.model_id, item) for item in items]))
    assert [per_model(cycle) for cycle in worker.cycles] == [
        {"a": ["ForwardBackward", "OptimStep"], "b": ["ForwardBackward"]},
        {"a": ["ForwardBackward", "ForwardBackward", "OptimStep"]},
    ]
    assert [outcome.cycle_id for outcome in outcomes] == [1, 1, 2, 2, 2, 1]


def test_the_queue_depth_counts_what_waits_and_is_read_without_the_queues():
    async def depths() -> list[int]:
        scheduler = Scheduler(RecordingWorker().run_cycle, CyclePolicy())
        tickets = [
            scheduler.submit(key, item) for key, item in [("a", forward("a")), ("a", step("a")), ("b", step("b"))]
        ]
        submitted = scheduler.queued()
        clock = asyncio.create_task(scheduler.run())
        await asyncio.gather(*(ticket.outcome for ticket in tickets))
        clock.cancel()
        scheduler._queues = None  # a metrics thread reading mid-change: the count needs no iteration
        return [submitted, scheduler.queued()]

    assert asyncio.run(depths()) == [3, 0]


def test_continuous_runs_a_lone_request_without_waiting():
    async def latency() -> float:
        scheduler = Scheduler(RecordingWorker().run_cycle, CyclePolicy())
        clock = asyncio.create_task(scheduler.run())
        loop = asyncio.get_running_loop()
        start = loop.time()
        await scheduler.submit("a", forward("a")).outcome
        clock.cancel()
        return loop.time() - start

    assert asyncio.run(latency()) < 0.05


def sample(sampler: str) -> ops.WorkItem:
    params = ops.SamplingConfig(8, 1.0, 0, 1.0, None, (), (), False)
    return ops.WorkItem("", "", ops.Sample(None, sampler, np.arange(4), 1, params, False, 0))


def test_a_burst_of_samples_starts_one_generation_and_a_lone_sample_waits_only_its_gap():
    """Samples sent 1 ms apart (an RL step's prompts) share the cycle that starts generating; a
    lone one waits for no more than the gap that tells a burst has ended."""

    async def burst_then_lone() -> tuple[list[int], float]:
        worker = RecordingWorker()
        scheduler = Scheduler(worker.run_cycle, CyclePolicy())
        clock = asyncio.create_task(scheduler.run())
        tickets = []
        for _ in range(8):
            tickets.append(scheduler.submit("sampler", sample("sampler")))
            await asyncio.sleep(0.001)
        await asyncio.gather(*(ticket.outcome for ticket in tickets))
        await asyncio.sleep(DEFAULT_COALESCE_SECONDS)
        loop = asyncio.get_running_loop()
        start = loop.time()
        await scheduler.submit("sampler", sample("sampler")).outcome
        lone_latency = loop.time() - start
        clock.cancel()
        return [len(cycle) for cycle in worker.cycles], lone_latency

    sizes, lone_latency = asyncio.run(burst_then_lone())
    assert sizes == [8, 1]
    assert SAMPLE_BURST_GAP_SECONDS <= lone_latency < SAMPLE_BURST_GAP_SECONDS + 0.05


def test_fixed_cycles_batch_what_arrives_within_a_tick():
    async def scenario() -> list[list[tuple[str, str]]]:
        worker = RecordingWorker()
        scheduler = Scheduler(worker.run_cycle, CyclePolicy(period=0.3))
        clock = asyncio.create_task(scheduler.run())
        first = scheduler.submit("a", forward("a"))
        await asyncio.sleep(0.05)
        second = scheduler.submit("b", forward("b"))
        await asyncio.gather(first.outcome, second.outcome)
        clock.cancel()
        return worker.cycles

    assert [per_model(cycle) for cycle in asyncio.run(scenario())] == [
        {"a": ["ForwardBackward"], "b": ["ForwardBackward"]}
    ]


def test_a_failed_worker_fails_the_cycle_with_unavailable():
    async def broken(cycle: ops.Cycle) -> list[ops.Outcome]:
        raise RuntimeError("worker process exited")

    scheduler = Scheduler(broken, CyclePolicy())
    (outcome,) = asyncio.run(run_all(scheduler, [("a", forward("a"))]))
    assert outcome.error is not None and outcome.error.code == 14  # UNAVAILABLE
    assert "worker process exited" in outcome.error.message


@pytest.mark.parametrize("text", ["fixed", "fixed:0", "fixed:-1", "fixed:abc", "sometimes", "continuous:-1"])
def test_bad_cycle_policies_are_rejected(text):
    with pytest.raises(ValueError, match="--cycle"):
        CyclePolicy.parse(text)


def test_cycle_policies_parse():
    assert CyclePolicy.parse("continuous") == CyclePolicy()
    assert CyclePolicy.parse("continuous:0") == CyclePolicy(coalesce=0.0)
    assert CyclePolicy.parse("fixed:2.5") == CyclePolicy(period=2.5)


def test_continuous_waits_briefly_for_the_tenants_it_just_served():
    """Tenants training in lock-step share a cycle instead of splitting into two groups."""

    async def scenario() -> list[dict[str, list[str]]]:
        worker = RecordingWorker(delay=0.01)
        scheduler = Scheduler(worker.run_cycle, CyclePolicy(coalesce=0.2))
        clock = asyncio.create_task(scheduler.run())
        await asyncio.gather(*(scheduler.submit(key, forward(key)).outcome for key in ("a", "b")))
        # a comes back at once, b 30 ms later: both still make the same cycle.
        first = scheduler.submit("a", forward("a"))
        await asyncio.sleep(0.03)
        second = scheduler.submit("b", forward("b"))
        await asyncio.gather(first.outcome, second.outcome)
        clock.cancel()
        return [per_model(cycle) for cycle in worker.cycles]

    cycles = asyncio.run(scenario())
    assert cycles[-1] == {"a": ["ForwardBackward"], "b": ["ForwardBackward"]}


def test_a_flooding_tenant_delays_another_tenants_request_by_at_most_one_cycle():
    async def scenario() -> tuple[list[int], int, int]:
        worker = RecordingWorker(delay=0.005)
        scheduler = Scheduler(worker.run_cycle, CyclePolicy(coalesce=0.0), max_cycle_tokens=4000)
        clock = asyncio.create_task(scheduler.run())
        flood = [scheduler.submit("flooder", forward("flooder", tokens=1000)) for _ in range(40)]
        await asyncio.sleep(0)  # the first cycle is under way
        running = len(worker.cycles) + 1
        single = scheduler.submit("other", forward("other", tokens=10))
        outcome = await single.outcome
        await asyncio.gather(*(ticket.outcome for ticket in flood))
        clock.cancel()
        return [len(cycle) for cycle in worker.cycles], outcome.cycle_id, running

    sizes, cycle_of_single, running = asyncio.run(scenario())
    assert cycle_of_single <= running + 1
    assert max(sizes) <= 5  # 4 x 1000 flooder tokens + the 10-token request, never the whole backlog


def test_a_request_larger_than_the_cycle_cap_still_runs_alone():
    scheduler = Scheduler(RecordingWorker().run_cycle, CyclePolicy(), max_cycle_tokens=100)
    outcomes = asyncio.run(run_all(scheduler, [("a", forward("a", tokens=500)), ("b", forward("b", tokens=50))]))
    assert sorted(outcome.cycle_id for outcome in outcomes) == [1, 2]


def test_a_sample_answered_cycles_later_reaches_its_ticket():
    """A worker still generating answers a sample in a later cycle: the scheduler keeps running
    (empty) cycles for it until then."""
    calls: list[list[str]] = []

    async def run_cycle(cycle: ops.Cycle) -> list[ops.Outcome]:
        calls.append([item.future_id for item in cycle.items])
        if len(calls) == 3:
            return [ops.Outcome("gen", cycle.cycle_id, result=ops.SampleResult([]))]
        return []

    async def scenario() -> ops.Outcome:
        scheduler = Scheduler(run_cycle, CyclePolicy())
        clock = asyncio.create_task(scheduler.run())
        sampling = ops.SamplingConfig(8, 1.0, 0, 1.0, 1, (), (), True)
        sample = ops.Sample(None, None, np.array([1, 2], dtype=np.int64), 1, sampling, False, 0)
        ticket = scheduler.submit("sampler", ops.WorkItem("gen", "", sample))
        try:
            return await asyncio.wait_for(ticket.outcome, 5)
        finally:
            clock.cancel()

    outcome = asyncio.run(scenario())
    assert outcome.future_id == "gen" and outcome.error is None
    assert calls == [["gen"], [], []]


def test_a_tick_runs_one_cycle_with_nothing_queued():
    """What settles the worker's adapters between requests goes through the scheduler, so any
    outcome that cycle brings (a sample finishing) is answered like every other."""
    calls: list[list[str]] = []

    async def run_cycle(cycle: ops.Cycle) -> list[ops.Outcome]:
        calls.append([item.future_id for item in cycle.items])
        return []

    async def scenario() -> None:
        scheduler = Scheduler(run_cycle, CyclePolicy())
        clock = asyncio.create_task(scheduler.run())
        await asyncio.sleep(0.05)
        assert calls == []  # nothing queued: no cycle
        scheduler.tick()
        await asyncio.sleep(0.05)
        clock.cancel()

    asyncio.run(scenario())
    assert calls == [[]]

"""The sampling engine in process: seeded draws independent of batch mates, logprobs equal to a
forward pass, one prefill per distinct prompt, stop strings across token boundaries."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinker_server import ops
from tinker_server.worker import sampling
from tinker_server.worker.models import byte_tokenizer
from tinker_server.worker.sampling import Generation, TokenChoice, _StopChecker

from .engine_helpers import engine_with_adapters


@pytest.fixture(scope="module")
def engine():
    return engine_with_adapters()


def sample(
    prompt: list[int],
    num_samples: int = 1,
    adapter: str | None = None,
    max_tokens: int = 12,
    temperature: float = 1.0,
    seed: int | None = 5,
    stop_strings: tuple[str, ...] = (),
    top_k: int = 0,
    top_p: float = 1.0,
) -> ops.Sample:
    params = ops.SamplingConfig(max_tokens, temperature, top_k, top_p, seed, stop_strings, (), True)
    return ops.Sample(adapter, None, np.asarray(prompt, dtype=np.int64), num_samples, params, False, 0)


def run(engine, *requests: ops.Sample) -> list[ops.SampleResult]:
    items = [ops.WorkItem(f"f{index}", "", request) for index, request in enumerate(requests)]
    outcomes = engine.run_cycle(ops.Cycle(1, items))
    assert all(outcome.error is None for outcome in outcomes), [outcome.error for outcome in outcomes]
    return [outcome.result for outcome in outcomes]


def tokens_of(result: ops.SampleResult) -> list[list[int]]:
    return [sequence.tokens.tolist() for sequence in result.sequences]


def next_token_pass(future_id: str, adapter: str, tokens, backward: bool = False) -> ops.WorkItem:
    """A cross-entropy pass of `adapter` over `tokens`, each predicted from those before it."""
    tokens = np.asarray(tokens, dtype=np.int64)
    weights = np.ones(len(tokens) - 1, dtype=np.float32)
    datum = ops.DatumArrays(tokens[:-1], {"target_tokens": tokens[1:], "weights": weights})
    return ops.WorkItem(future_id, adapter, ops.ForwardBackward([datum], "cross_entropy", {}, backward))


def test_a_seeded_sample_is_the_same_whatever_shares_its_batch(engine):
    alone = sample([256, 72, 105, 33], num_samples=3, adapter="a", top_k=40, top_p=0.9)
    (by_itself,) = run(engine, alone)
    mates = [
        sample([256, 10], num_samples=4, adapter="b", max_tokens=2),  # finishes early: leaves the batch
        sample(list(range(256, 259)) + list(range(30)), num_samples=2, temperature=0.7, seed=None),
        sample([256, 72, 105, 33], num_samples=1, adapter="b", temperature=0.0),
    ]
    crowded = run(engine, mates[0], alone, *mates[1:])[1]
    assert tokens_of(crowded) == tokens_of(by_itself)
    assert len({tuple(tokens) for tokens in tokens_of(by_itself)}) == 3  # each sample its own stream
    for lonely, shared in zip(by_itself.sequences, crowded.sequences, strict=True):
        np.testing.assert_allclose(shared.logprobs, lonely.logprobs, atol=1e-5)
        np.testing.assert_allclose(shared.sampling_logprobs, lonely.sampling_logprobs, atol=1e-5)


def recorded_device_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The Tensor methods that read a tensor's values on the host (each stalls a GPU's queue),
    recorded by name as they are called from now on."""
    reads: list[str] = []
    for name in ("__bool__", "__int__", "__float__", "item", "tolist", "numpy", "cpu"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor,
            name,
            lambda tensor, *args, _original=original, _name=name: reads.append(_name) or _original(tensor, *args),
        )
    return reads


def test_token_choice_reads_the_device_once_per_step(monkeypatch):
    """Which rows draw and which truncate is known on the host: a step of greedy, top-k, top-p and
    plain rows reads the device once, for the tokens chosen."""
    requests = [sample([1], temperature=0.0), sample([1], top_k=5), sample([1], top_p=0.5), sample([1], seed=None)]
    choice = TokenChoice(requests, [0] * len(requests))
    reads = recorded_device_reads(monkeypatch)
    tokens, picks, _ = choice.next(torch.randn(len(requests), 259), list(range(len(requests))))
    monkeypatch.undo()
    assert reads == ["tolist"]
    assert [token for token, _, _ in picks] == tokens.tolist()


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.7, 5, 0.8)])
def test_draws_follow_the_truncated_distribution(temperature, top_k, top_p):
    """4000 rows (seeds of one request's samples), 5 steps each: every token's frequency is within
    4 standard errors of its probability under temperature, top-k then top-p; none outside them."""
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.6, 0.3, 0.0, -0.5, -1.0]]).expand(4000, -1)
    request = sample([1], temperature=temperature, top_k=top_k, top_p=top_p)
    choice = TokenChoice([request] * len(logits), list(range(len(logits))))
    drawn = torch.cat([choice.next(logits, list(range(len(logits))))[0] for _ in range(5)])

    scaled = logits[0] / temperature
    support = torch.argsort(scaled, descending=True)[: top_k or None]
    probs = torch.softmax(scaled[support], -1)
    support = support[(torch.cumsum(probs, 0) - probs) < top_p]
    expected = torch.zeros_like(scaled).index_copy_(0, support, torch.softmax(scaled[support], -1))
    frequency = torch.bincount(drawn, minlength=len(scaled)) / len(drawn)
    error = (expected * (1 - expected) / len(drawn)).sqrt()
    assert (frequency[expected == 0] == 0).all()
    assert ((frequency - expected).abs() <= 4 * error).all(), (frequency, expected)


def test_top_p_over_the_most_likely_tokens_draws_what_sorting_the_whole_vocabulary_draws(monkeypatch):
    """Top-p is worked out over each row's most likely tokens, and over the whole vocabulary only
    where they hold too little probability: the same tokens and logprobs as sorting it all, for
    peaked and flat distributions, top-k and top-p mixed, greedy and plain rows beside them, over
    steps whose candidates grow; each step reads the device once, twice where a row needed more."""
    vocab, steps = 4096, 4
    generator = torch.Generator().manual_seed(0)
    spreads = torch.tensor([8.0, 4.0, 0.5, 0.1, 8.0, 0.5, 2.0, 0.5])[:, None]  # peaked ... nearly uniform
    logits = [torch.randn(len(spreads), vocab, generator=generator) * spreads for _ in range(steps)]
    requests = [
        sample([1], top_p=0.9),
        sample([1], top_p=0.5, temperature=0.7),
        sample([1], top_p=0.9),  # flat: its nucleus holds thousands of tokens
        sample([1], top_p=0.99),
        sample([1], top_k=20, top_p=0.8),
        sample([1], top_k=300),
        sample([1], temperature=0.0),
        sample([1]),
    ]
    active = list(range(len(requests)))

    def draws(min_candidates: int) -> tuple[list, list[list[str]]]:
        monkeypatch.setattr(sampling, "MIN_CANDIDATES", min_candidates)
        choice = TokenChoice(requests, list(range(len(requests))))
        picks, reads_per_step = [], []
        for step_logits in logits:
            reads = recorded_device_reads(monkeypatch)
            tokens, step_picks, _ = choice.next(step_logits, active)
            monkeypatch.undo()
            monkeypatch.setattr(sampling, "MIN_CANDIDATES", min_candidates)
            assert [token for token, _, _ in step_picks] == tokens.tolist()
            picks.append(step_picks)
            reads_per_step.append(reads)
        return picks, reads_per_step

    candidates, reads = draws(16)
    sorted_whole, _ = draws(vocab)
    for step, (ours, reference) in enumerate(zip(candidates, sorted_whole, strict=True)):
        assert [token for token, _, _ in ours] == [token for token, _, _ in reference], step
        np.testing.assert_allclose(np.array(ours)[:, 1:], np.array(reference)[:, 1:], rtol=1e-5, atol=1e-6)
    assert reads[0] == ["tolist", "tolist"]  # 16 candidates cannot hold the flat rows' top-p sets
    assert ["tolist"] in reads[1:]  # more candidates the next step held them


def test_a_top_p_row_draws_the_same_whatever_its_batch_mates_make_it_consider():
    """A batch mate's top-k decides how many candidates every row is worked out over; with logits
    of a bf16 model (many ties) a row still keeps, and draws, the same tokens: the cuts are
    thresholds, ties at a cut all kept."""
    vocab, steps = 4096, 6
    generator = torch.Generator().manual_seed(1)
    logits = [(torch.randn(1, vocab, generator=generator) * 3).bfloat16().float() for _ in range(steps)]
    row = sample([1], top_p=0.9, seed=11)

    def draws(*mates: ops.Sample) -> list[tuple[int, float, float]]:
        choice = TokenChoice([row, *mates], [0] * (1 + len(mates)))
        filler = torch.zeros(len(mates), vocab)
        return [choice.next(torch.cat([step, filler]), list(range(1 + len(mates))))[1][0] for step in logits]

    alone = draws()
    assert draws(sample([1], top_k=3000, seed=12)) == alone  # every row worked out over 4096 candidates
    assert draws(sample([1], top_p=0.5, seed=13), sample([1], temperature=0.0)) == alone


def test_a_row_of_nan_logits_draws_a_token_of_the_vocabulary():
    """A model that overflows gives NaN logits: its row still gets a token within the vocabulary
    (an index past it would end a GPU worker's device context), and its batch mates their own."""
    requests = [sample([1], seed=1), sample([1], seed=2, top_p=0.5)]
    logits = torch.randn(2, 259)
    logits[0] = float("nan")
    tokens, picks, _ = TokenChoice(requests, [0, 0]).next(logits, [0, 1])
    assert tokens.tolist()[0] < 259
    assert picks[1][0] == tokens.tolist()[1] and np.isfinite(picks[1][1])


def test_a_decode_step_with_nothing_masked_reads_the_device_once(engine, monkeypatch):
    """Prompts of one length, rows leaving as they finish: each step reads only the tokens chosen
    (given an attention mask, Hugging Face reads the device at every step to find nothing masked)."""
    reads = recorded_device_reads(monkeypatch)
    steps: list[list[str]] = []
    step = Generation.step

    def recorded_step(generation: Generation) -> None:
        start = len(reads)
        step(generation)
        steps.append(reads[start:])

    monkeypatch.setattr(Generation, "step", recorded_step)
    run(engine, sample([256, 1, 2], 4, adapter="a", max_tokens=3), sample([256, 3, 4], 2, max_tokens=10))
    monkeypatch.undo()
    assert len(steps) == 10
    assert all(reads == ["tolist"] for reads in steps), steps


def test_a_request_is_answered_when_its_own_rows_finish_not_when_its_batch_mates_do(engine):
    short, long = sample([256, 1], num_samples=2, max_tokens=3), sample([256, 2], max_tokens=30)
    items = [ops.WorkItem("short", "", short), ops.WorkItem("long", "", long)]
    answered: dict[str, tuple[int, ops.Outcome]] = {}
    cycle, outcomes = 1, engine.run_cycle(ops.Cycle(1, items), decode_seconds=0.0)  # a step per cycle
    while len(answered) < 2:
        answered.update((outcome.future_id, (cycle, outcome)) for outcome in outcomes)
        cycle += 1
        outcomes = engine.run_cycle(ops.Cycle(cycle, []), decode_seconds=0.0)
    assert answered["short"][0] == 3 and answered["long"][0] == 30
    assert tokens_of(answered["short"][1].result) == tokens_of(run(engine, short)[0])


def test_a_cycle_answering_training_steps_no_generation_right_after_one_that_did(engine):
    """A forward_backward that arrives while a generation decodes waits for the step under way,
    not for one more in its own cycle; the generation steps again in the next cycle, and in every
    other one while each brings training."""
    generation = sample([256, 3], max_tokens=4)
    training = [next_token_pass("fb", "a", [256, 5, 6, 7, 8])]
    cycles = [[ops.WorkItem("sample", "", generation)], training, training, [], [], []]
    answered: dict[str, list[int]] = {}
    for cycle, items in enumerate(cycles, start=1):
        for outcome in engine.run_cycle(ops.Cycle(cycle, items), decode_seconds=0.0):  # a step per cycle
            answered.setdefault(outcome.future_id, []).append(cycle)
            if outcome.future_id == "sample":
                sampled = outcome.result
    # Steps 1-4 in cycles 1, 3 (after cycle 2 answered training without one), 4 and 5.
    assert answered == {"fb": [2, 3], "sample": [5]}
    assert tokens_of(sampled) == tokens_of(run(engine, generation)[0])


@pytest.mark.parametrize("padded_rows_stay", [True, False])
def test_sampled_logprobs_equal_the_forward_pass_after_rows_left_the_batch(engine, padded_rows_stay):
    """The rows left padded (masked) go on, or those that were not (then nothing is masked)."""
    prompt, short_prompt = [256, 40, 41, 42], [256, 40]
    staying_prompt, leaving_prompt = (short_prompt, prompt) if padded_rows_stay else (prompt, short_prompt)
    leaving = sample(leaving_prompt, 3, adapter="a", max_tokens=3)
    _, result = run(engine, leaving, sample(staying_prompt, 2, adapter="b", max_tokens=16))
    for sequence in result.sequences:
        (outcome,) = engine.run_cycle(
            ops.Cycle(2, [next_token_pass("fwd", "b", staying_prompt + sequence.tokens.tolist())])
        )
        forward = outcome.result.loss_fn_outputs[0]["logprobs"][len(staying_prompt) - 1 :]
        np.testing.assert_allclose(sequence.logprobs, forward, atol=1e-4)


def test_prompts_of_different_lengths_prefill_in_passes_and_draw_what_each_draws_alone(monkeypatch):
    """Prompts of similar lengths share a prefill pass, within max_tokens_per_pass padded tokens
    (a longer one runs alone): each row draws, and each scored prompt (through its own adapter,
    the unembedding's included) gets the logprobs, that it gets prefilled alone."""
    engine = engine_with_adapters(max_tokens_per_pass=24)
    monkeypatch.setattr(sampling, "UNSPLIT_PREFILL_TOKENS", 0)  # every pass as tight as padding allows
    passes: list[list[int]] = []
    prefill = Generation._prefill

    def recorded_prefill(generation: Generation, prompts, requests):
        passes.append(sorted(len(prompt.tokens) for prompt in prompts))
        return prefill(generation, prompts, requests)

    monkeypatch.setattr(Generation, "_prefill", recorded_prefill)
    scored = dataclasses.replace(sample([256, 7, 8], adapter="b"), include_prompt_logprobs=True)  # its pass's row 1
    requests = [sample(list(range(1, 31)), adapter="b"), sample([5, 6, 7, 9], 2, adapter="a"), scored]
    requests.append(sample(list(range(40, 52)), adapter="a"))
    together = run(engine, *requests)
    assert passes == [[30], [12], [3, 4]]
    alone = [run(engine, request)[0] for request in requests]
    assert [tokens_of(result) for result in together] == [tokens_of(result) for result in alone]
    (forward,) = engine.run_cycle(ops.Cycle(2, [next_token_pass("fwd", "b", scored.prompt)]))
    expected = forward.result.loss_fn_outputs[0]["logprobs"]
    np.testing.assert_allclose(together[2].prompt.logprobs[1:], expected, atol=1e-4)


def test_a_prompt_is_prefilled_once_for_every_request_of_it(engine):
    prompt = [256, 1, 2, 3, 4, 5, 6]
    first, again = sample(prompt, 2, adapter="a", seed=1), sample(prompt, 3, adapter="a", seed=2)
    other_weights = sample(prompt, 1, adapter="b", seed=3)
    results = run(engine, first, again, other_weights)
    assert [result.prompt_cache_hit_tokens for result in results] == [0, len(prompt), 0]
    separately = [run(engine, request)[0] for request in (first, again, other_weights)]
    assert [tokens_of(result) for result in results] == [tokens_of(result) for result in separately]


def test_a_stop_string_split_across_tokens_ends_the_sequence_where_it_completes():
    tokenizer = byte_tokenizer()
    params = ops.SamplingConfig(64, 1.0, 0, 1.0, None, ("é!", "end"), (), True)
    checker = _StopChecker(params, (), tokenizer)
    text = "a" * 40 + "en" + "é" + "!"  # "é" is two byte tokens; the stop ends past many tokens
    tokens = tokenizer.encode(text, add_special_tokens=False)
    hits = [checker.hit(tokens[: end + 1]) for end in range(len(tokens))]
    assert hits == [False] * (len(tokens) - 1) + [True]
    assert checker.hit(tokenizer.encode("x" * 50 + "end", add_special_tokens=False))


def test_greedy_generation_stops_right_after_its_stop_string(engine):
    tokenizer = byte_tokenizer()
    (free,) = run(engine, sample([256, 72], adapter="a", temperature=0.0, max_tokens=16))
    text = tokenizer.decode(free.sequences[0].tokens.tolist())
    stop = text[5:7]  # two tokens the unstopped generation produces
    (stopped,) = run(engine, sample([256, 72], adapter="a", temperature=0.0, max_tokens=16, stop_strings=(stop,)))
    sequence = stopped.sequences[0]
    assert sequence.stopped and tokenizer.decode(sequence.tokens.tolist()).endswith(stop)
    assert stop not in tokenizer.decode(sequence.tokens[:-1].tolist())


def test_a_stop_string_completed_across_two_cycles_ends_the_sequence_as_in_one(engine):
    tokenizer = byte_tokenizer()
    (free,) = run(engine, sample([256, 80], adapter="b", temperature=0.0, max_tokens=16))
    stop = tokenizer.decode(free.sequences[0].tokens[6:8].tolist())  # tokens 7 and 8: drawn in two cycles
    request = sample([256, 80], adapter="b", temperature=0.0, max_tokens=16, stop_strings=(stop,))
    (whole,) = run(engine, request)
    outcomes, cycle = engine.run_cycle(ops.Cycle(1, [ops.WorkItem("gen", "", request)]), decode_seconds=0.0), 1
    while not outcomes:  # one token a cycle
        cycle += 1
        outcomes = engine.run_cycle(ops.Cycle(cycle, []), decode_seconds=0.0)
    (chunked,) = outcomes
    assert cycle == len(whole.sequences[0].tokens) <= 8 and chunked.result.sequences[0].stopped
    assert tokens_of(chunked.result) == tokens_of(whole)


def test_a_generation_goes_on_over_cycles_and_training_runs_in_between(engine):
    request = sample([256, 72, 105], num_samples=2, adapter="b", max_tokens=40, seed=9)
    (whole,) = run(engine, request)  # in one cycle, to its end

    started = engine.run_cycle(ops.Cycle(1, [ops.WorkItem("gen", "", request)]), decode_seconds=0.0)
    assert started == []  # one step done, the rest to come
    adam = ops.AdamConfig(0.05, 0.9, 0.95, 1e-8, 0.0, 0.0)
    training = [
        next_token_pass("fb", "b", np.random.default_rng(0).integers(0, 256, 9), backward=True),
        ops.WorkItem("step", "b", ops.OptimStep(adam)),
    ]
    answered = engine.run_cycle(ops.Cycle(2, training), decode_seconds=0.0)
    assert [outcome.future_id for outcome in answered] == ["fb", "step"]  # not held behind the generation
    assert all(outcome.error is None for outcome in answered)

    cycles, finished = 2, []
    while not finished:
        cycles += 1
        finished = engine.run_cycle(ops.Cycle(cycles, []), decode_seconds=0.0)
    (outcome,) = finished
    assert outcome.future_id == "gen" and cycles > 30  # one step a cycle
    # It sampled the weights it started with, whatever training did meanwhile.
    assert tokens_of(outcome.result) == tokens_of(whole)
    (after,) = run(engine, request)
    assert tokens_of(after) != tokens_of(whole)  # the step did change them


def test_requests_arriving_mid_generation_join_its_batch_and_draw_the_same(engine):
    early = sample([256, 72, 105, 33, 10], num_samples=2, adapter="a", max_tokens=30, seed=21)
    late = sample([256, 1, 2], num_samples=3, max_tokens=12, seed=22, top_k=20)
    alone = [run(engine, request)[0] for request in (early, late)]

    assert engine.run_cycle(ops.Cycle(1, [ops.WorkItem("early", "", early)]), decode_seconds=0.0) == []
    assert (
        engine.run_cycle(
            ops.Cycle(
                2,
                [],
            ),
            decode_seconds=0.0,
        )
        == []
    )  # a few steps on
    answered = {}
    cycle = 3
    items = [ops.WorkItem("late", "", late)]
    while len(answered) < 2:
        for outcome in engine.run_cycle(ops.Cycle(cycle, items), decode_seconds=0.0):
            answered[outcome.future_id] = outcome.result
        if cycle == 3:
            assert engine.decoder.batches == 1  # the late rows joined the running batch
        cycle, items = cycle + 1, []
    assert tokens_of(answered["early"]) == tokens_of(alone[0])
    assert tokens_of(answered["late"]) == tokens_of(alone[1])
    for joined, lonely in zip(answered["late"].sequences, alone[1].sequences, strict=True):
        np.testing.assert_allclose(joined.logprobs, lonely.logprobs, atol=1e-5)


def test_a_cycle_decodes_on_while_nothing_waits_and_answers_after_one_step_when_something_does(engine, monkeypatch):
    request = sample([256, 72, 105], num_samples=2, max_tokens=30, seed=9)
    (whole,) = run(engine, request)

    # Nothing waits for the next cycle: this one goes past its (zero) chunk to the generation's end.
    monkeypatch.setattr(engine.decoder, "max_uninterrupted_seconds", 600.0)  # (a busy machine is slow)
    nothing_waits = engine.run_cycle(ops.Cycle(1, [ops.WorkItem("gen", "", request)]), 0.0, interrupt=lambda: False)
    assert [tokens_of(outcome.result) for outcome in nothing_waits] == [tokens_of(whole)]

    # Requests wait: one step, however long the chunk, and the cycle answers.
    asked = []
    item = ops.WorkItem("gen", "", request)
    assert engine.run_cycle(ops.Cycle(2, [item]), 10.0, interrupt=lambda: asked.append(True) or True) == []
    assert len(asked) == 1

    # A cycle with answers of its own ready decodes its chunk only, even with nothing waiting.
    forward = next_token_pass("fwd", "a", range(9))
    answered = engine.run_cycle(ops.Cycle(3, [forward]), 0.0, interrupt=lambda: False)
    assert [outcome.future_id for outcome in answered] == ["fwd"]
    (rest,) = engine.run_cycle(ops.Cycle(4, []))
    assert tokens_of(rest.result) == tokens_of(whole)


def test_a_finished_row_riding_along_after_its_weights_copy_is_gone_changes_no_other_row(engine):
    long = sample([256, 5, 6], num_samples=10, adapter="a", max_tokens=12, seed=3)
    short = sample([256, 7], adapter="b", max_tokens=2, seed=4)
    alone = [run(engine, request)[0] for request in (long, short)]
    adapters = next(iter(engine.layers.values())).adapters
    items = [ops.WorkItem("long", "", long), ops.WorkItem("short", "", short)]
    answered, cycle = {}, 1
    outcomes = engine.run_cycle(ops.Cycle(cycle, items), decode_seconds=0.0)  # decoding across cycles: copies
    while len(answered) < 2:
        answered |= {outcome.future_id: outcome.result for outcome in outcomes}
        if "short" in answered and "long" not in answered:
            # 1 finished row of 11 stays (less than an eighth), its weights copy released with its answer.
            assert engine.decoder.rows == 11 and not any(name.startswith("b#generation") for name in adapters)
        cycle += 1
        outcomes = engine.run_cycle(ops.Cycle(cycle, []), decode_seconds=0.0)
    assert tokens_of(answered["long"]) == tokens_of(alone[0]) and tokens_of(answered["short"]) == tokens_of(alone[1])


SHARED_PREFIX = [256, *range(40, 60)]
"""Longer than a prefix block: prompts that start with it reuse its keys and values (base model)."""


@st.composite
def arrivals(draw) -> list[list[ops.Sample]]:
    """Cycles of sample requests arriving (some cycles bring none): prompts with and without a
    shared prefix, one to three samples, the base model or either adapter, short and long outputs,
    greedy and truncated draws, stop strings that end rows at random steps."""

    def request() -> ops.Sample:
        own = draw(st.lists(st.integers(0, 255), min_size=1, max_size=6))
        return sample(
            (SHARED_PREFIX if draw(st.booleans()) else [256]) + own,
            num_samples=draw(st.integers(1, 3)),
            adapter=draw(st.sampled_from([None, "a", "b"])),
            max_tokens=draw(st.integers(1, 14)),
            temperature=draw(st.sampled_from([0.0, 0.8, 1.0])),
            seed=draw(st.integers(0, 2**31 - 1)),
            stop_strings=draw(st.sampled_from([(), ("e",), ("ab", "\n")])),
            top_k=draw(st.sampled_from([0, 20])),
            top_p=draw(st.sampled_from([1.0, 0.9])),
        )

    return [[request() for _ in range(draw(st.integers(0, 3)))] for _ in range(draw(st.integers(1, 5)))]


@pytest.fixture(scope="module")
def tight_engine():
    """A KV cache budget of a few rows' worth: requests wait for room, then join running batches;
    and prefill passes of 16 padded tokens at most: a batch's prompts prefill apart, then join."""
    per_token = engine_with_adapters(()).decoder.budget.bytes_per_token
    return engine_with_adapters(kv_cache_bytes=per_token * 8 * (len(SHARED_PREFIX) + 7 + 14), max_tokens_per_pass=16)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schedule=arrivals())
def test_requests_arriving_over_cycles_draw_what_each_draws_alone(tight_engine, schedule):
    """Whatever arrives when, waits for room, joins, shares a prefix, stops or leaves: every
    seeded request gets the tokens (and logprobs) it gets run alone. Training answered between
    steps (a forward pass) changes nothing either."""
    engine = tight_engine
    requests = {
        f"r{cycle}.{index}": request for cycle, batch in enumerate(schedule) for index, request in enumerate(batch)
    }
    answered: dict[str, ops.SampleResult] = {}
    for cycle in range(1000):  # (a bound: a request never answered fails below, not hangs)
        items = [
            ops.WorkItem(f"r{cycle}.{index}", "", request)
            for index, request in enumerate(schedule[cycle] if cycle < len(schedule) else [])
        ]
        if cycle % 3 == 2:
            items.append(next_token_pass(f"fb{cycle}", "a", [256, 5, 6, 7, 8]))
        for outcome in engine.run_cycle(ops.Cycle(cycle + 1, items), decode_seconds=0.0):  # a step per cycle
            assert outcome.error is None, outcome.error
            if outcome.future_id in requests:
                answered[outcome.future_id] = outcome.result
        if cycle >= len(schedule) and len(answered) == len(requests):
            break
    assert engine.decoder.rows == 0 and engine.decoder.reserved_bytes == 0
    for future_id, request in requests.items():
        (alone,) = run(engine, request)
        assert tokens_of(answered[future_id]) == tokens_of(alone), future_id
        for shared, lonely in zip(answered[future_id].sequences, alone.sequences, strict=True):
            np.testing.assert_allclose(shared.logprobs, lonely.logprobs, atol=1e-4)

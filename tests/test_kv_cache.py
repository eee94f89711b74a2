"""The sampling engine's keys and values in process: reserved once per generation within the
budget, requests waiting for room, and prompts reused across requests with the same prefix (only
while the weights that computed them are unchanged)."""

from __future__ import annotations

import grpc
import numpy as np
import torch

from tinker_server import ops
from tinker_server.worker.kv_cache import CPU_KV_CACHE_BYTES, PREFIX_BLOCK, GenerationCache, KeptPrompt, PrefixCache
from tinker_server.worker.models import cache_keyword, final_hidden_states, load_base_model

from .engine_helpers import engine_with_adapters
from .test_sampling_engine import run, sample, tokens_of

RNG = np.random.default_rng(3)
PROMPT = [256, *RNG.integers(0, 256, 47).tolist()]
"""Three whole blocks."""


def starting_like(prompt: list[int], shared: int, seed: int) -> list[int]:
    tail = np.random.default_rng(seed).integers(0, 256, 10).tolist()
    return prompt[:shared] + tail


def computing_everything(engine, request: ops.Sample) -> ops.SampleResult:
    """The request's result with no prompt kept to reuse."""
    engine.decoder.budget.prefixes.shrink_to(0)
    (result,) = run(engine, request)
    return result


def assert_same_draws(result: ops.SampleResult, reference: ops.SampleResult) -> None:
    assert tokens_of(result) == tokens_of(reference)
    for sequence, expected in zip(result.sequences, reference.sequences, strict=True):
        np.testing.assert_allclose(sequence.logprobs, expected.logprobs, atol=1e-4)


def test_a_prompt_starting_like_an_earlier_one_reuses_its_whole_blocks():
    engine, fresh = engine_with_adapters(), engine_with_adapters()
    (first,) = run(engine, sample(PROMPT, max_tokens=8))
    assert first.prompt_cache_hit_tokens == 0

    later = [sample(starting_like(PROMPT, 40, seed), 2, max_tokens=10, seed=seed) for seed in (1, 2)]
    unrelated = sample(starting_like([256, 9, 9, 9], 4, 7), max_tokens=10)
    results = run(engine, *later, unrelated)
    # 40 shared tokens: two whole blocks are reused; an unrelated prompt computes everything.
    assert [result.prompt_cache_hit_tokens for result in results] == [2 * PREFIX_BLOCK, 2 * PREFIX_BLOCK, 0]
    for result, request in zip(results, [*later, unrelated], strict=True):
        assert_same_draws(result, computing_everything(fresh, request))  # what computing the whole prompt draws

    # A live run's weights change under it: nothing is reused for them.
    (live,) = run(engine, sample(starting_like(PROMPT, 40, 3), adapter="a"))
    (live_again,) = run(engine, sample(starting_like(PROMPT, 40, 4), adapter="a"))
    assert live.prompt_cache_hit_tokens == live_again.prompt_cache_hit_tokens == 0


def test_prompts_of_one_batch_that_begin_alike_compute_their_shared_blocks_once():
    engine, fresh = engine_with_adapters(), engine_with_adapters()
    alike = [sample(starting_like(PROMPT, 35, seed), 2, seed=seed) for seed in (1, 2, 3)]
    scored = sample(starting_like(PROMPT, 35, 4))
    scored.include_prompt_logprobs = True  # needs every prompt position's logits: computes all
    results = run(engine, *alike, scored)
    assert [result.prompt_cache_hit_tokens for result in results] == [0, 32, 32, 0]
    for result, request in zip(results, [*alike, scored], strict=True):
        assert_same_draws(result, computing_everything(fresh, request))
    expected = computing_everything(fresh, scored).prompt.logprobs
    np.testing.assert_allclose(results[3].prompt.logprobs, expected, atol=1e-5)


def test_a_snapshot_saved_again_under_its_name_reuses_nothing_of_the_old_weights(tmp_path):
    engine, fresh = engine_with_adapters(), engine_with_adapters()
    path = "tinker://a/sampler_weights/latest"

    def save(directory: str) -> None:
        (saved,) = engine.run_cycle(ops.Cycle(2, [ops.WorkItem("s", "a", ops.SaveForSampler(path, directory))]))
        assert saved.error is None, saved.error

    save(str(tmp_path / "one"))
    run(engine, sample(PROMPT, adapter=path))
    (hit,) = run(engine, sample(starting_like(PROMPT, 33, 1), adapter=path))
    assert hit.prompt_cache_hit_tokens == 2 * PREFIX_BLOCK

    for pair in engine.residency.run("a").pairs.values():  # training moves the run on
        pair.B.data.mul_(-1.0)
    save(str(tmp_path / "two"))
    request = sample(starting_like(PROMPT, 33, 2), adapter="a", temperature=0.0)
    (after,) = run(engine, sample(starting_like(PROMPT, 33, 2), adapter=path, temperature=0.0))
    assert after.prompt_cache_hit_tokens == 0
    for pair in fresh.residency.run("a").pairs.values():
        pair.B.data.mul_(-1.0)
    assert_same_draws(after, computing_everything(fresh, request))


def test_requests_wait_for_room_in_the_kv_budget_and_one_too_large_fails_alone():
    reference = engine_with_adapters()
    assert reference.decoder.budget.total_bytes == CPU_KV_CACHE_BYTES  # the default on a CPU
    per_token = reference.decoder.budget.bytes_per_token
    budget = per_token * 128  # 128 positions of one row
    engine = engine_with_adapters(kv_cache_bytes=budget)

    too_large = sample([256, 1, 2, 3], num_samples=4, max_tokens=60)  # 4 x 64 positions
    first, second = sample([256, 5, 6], max_tokens=90, seed=1), sample([256, 7, 8], max_tokens=90, seed=2)
    items = [ops.WorkItem(name, "", request) for name, request in zip("xab", (too_large, first, second), strict=True)]
    answered = {outcome.future_id: outcome for outcome in engine.run_cycle(ops.Cycle(1, items), decode_seconds=0.0)}
    assert answered["x"].error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert "--kv-cache-bytes" in answered["x"].error.message and "num_samples=4" in answered["x"].error.message

    finished_at, cycle = {}, 1
    while len(answered) < 3:
        assert engine.decoder.reserved_bytes <= budget
        assert engine.decoder.batches == 1  # the second waits: the two together do not fit
        cycle += 1
        for outcome in engine.run_cycle(ops.Cycle(cycle, []), decode_seconds=0.0):
            answered[outcome.future_id], finished_at[outcome.future_id] = outcome, cycle
    assert finished_at["a"] < finished_at["b"]
    for name, request in (("a", first), ("b", second)):
        assert_same_draws(answered[name].result, run(reference, request)[0])


def test_a_generation_reserves_its_positions_once_and_gives_back_those_of_rows_that_finish():
    engine = engine_with_adapters()
    per_token = engine.decoder.budget.bytes_per_token
    short, long = sample([256, 1, 2, 3], max_tokens=4, seed=1), sample([256, 4, 5, 6], max_tokens=40, seed=2)
    items = [ops.WorkItem("short", "", short), ops.WorkItem("long", "", long)]
    assert engine.run_cycle(ops.Cycle(1, items), decode_seconds=0.0) == []
    reserved = engine.decoder.reserved_bytes
    assert reserved == 2 * (4 + 40) * per_token  # every row, room for its prompt and the longest output
    engine.run_cycle(ops.Cycle(2, []), decode_seconds=0.0)
    assert engine.decoder.reserved_bytes == reserved  # a step writes in place
    cycle = 2
    while engine.decoder.reserved_bytes == reserved:
        cycle += 1
        engine.run_cycle(ops.Cycle(cycle, []), decode_seconds=0.0)
    assert cycle == 4  # the short request's fourth token: its row leaves, and its room with it
    # One row left: its prompt, the 3 tokens in the cache (the 4th goes in next) and the 36 it may still draw.
    assert engine.decoder.reserved_bytes == (4 + 3 + 36) * per_token


def test_rows_leaving_never_take_a_generation_past_what_it_was_admitted_with():
    """Rows that leave move the others into a spare pair of buffers: it is counted from the start."""
    engine = engine_with_adapters()
    requests = [sample([256, index], max_tokens=4 * (index + 1), seed=index) for index in range(8)]
    items = [ops.WorkItem(f"r{index}", "", request) for index, request in enumerate(requests)]
    engine.run_cycle(ops.Cycle(1, items), decode_seconds=0.0)
    admitted = engine.decoder.reserved_bytes
    assert admitted == engine.decoder.budget.rows_bytes(8, 2 + 32)
    cycle = 1
    while engine.decoder.rows:
        cycle += 1
        engine.run_cycle(ops.Cycle(cycle, []), decode_seconds=0.0)
        assert engine.decoder.reserved_bytes <= admitted


def test_the_weights_copy_a_generation_reads_counts_against_the_budget_until_it_is_answered():
    engine = engine_with_adapters()
    adapter_bytes = sum(pair.A.nbytes + pair.B.nbytes for pair in engine.residency.run("a").pairs.values())
    items = [ops.WorkItem(name, "", sample([256, 1, 2, 3], adapter="a", max_tokens=6)) for name in ("x", "y")]
    engine.run_cycle(ops.Cycle(1, items), decode_seconds=0.0)  # a run's weights: one copy for the cycle's samples
    assert engine.decoder.reserved_bytes == engine.decoder.budget.rows_bytes(2, 4 + 6) + adapter_bytes
    cycle = 1
    while engine.decoder.rows:
        cycle += 1
        engine.run_cycle(ops.Cycle(cycle, []), decode_seconds=0.0)
    assert engine.decoder.reserved_bytes == 0


def test_the_prefix_cache_keeps_each_prompt_once_and_drops_the_least_recently_used_first():
    cache = PrefixCache()

    def kept(tokens: list[int]) -> KeptPrompt:
        return KeptPrompt("w", np.asarray(tokens), [torch.zeros(1, len(tokens), 1)], [torch.zeros(1, len(tokens), 1)])

    base = list(range(40))
    cache.keep(kept(base[:20]))
    assert not cache.wants("w", np.asarray(base[:18]))  # begins a kept prompt: nothing new
    cache.keep(kept(base))  # begins with the kept one: replaces it
    cache.keep(kept([7] * 33))
    assert cache.nbytes == (40 + 33) * 2 * 4
    found, length = cache.longest_prefix("w", np.asarray(base[:35] + [99]))
    assert found.tokens.tolist() == base and length == 32
    assert cache.longest_prefix("other weights", np.asarray(base))[1] == 0

    cache.shrink_to(40 * 2 * 4)  # the [7] prompt was used least lately
    assert cache.longest_prefix("w", np.asarray([7] * 33))[1] == 0
    assert cache.longest_prefix("w", np.asarray(base))[1] == 32
    cache.forget("w")
    assert cache.nbytes == 0 and cache.longest_prefix("w", np.asarray(base))[1] == 0


def test_generations_reading_a_snapshot_share_one_copy_of_it_and_a_runs_get_their_own(tmp_path):
    engine = engine_with_adapters()
    path = "tinker://a/sampler_weights/shared"
    (saved,) = engine.run_cycle(ops.Cycle(1, [ops.WorkItem("s", "a", ops.SaveForSampler(path, str(tmp_path)))]))
    assert saved.error is None, saved.error
    any_layer = next(iter(engine.layers.values()))

    def copies() -> int:
        return sum("#generation-" in name for name in any_layer.adapters)

    answered, cycle = set(), 1
    for adapter in (path, path, "a", "a"):  # a cycle each, the earlier ones still generating
        cycle += 1
        item = ops.WorkItem(f"gen-{cycle}", "", sample(PROMPT, adapter=adapter, max_tokens=40, seed=cycle))
        answered |= {outcome.future_id for outcome in engine.run_cycle(ops.Cycle(cycle, [item]), 0.0)}
    assert not answered and copies() == 1 + 2  # the snapshot's, shared; one per cycle of the live run's
    while len(answered) < 4:
        cycle += 1
        answered |= {outcome.future_id for outcome in engine.run_cycle(ops.Cycle(cycle, []), 0.0)}
    assert copies() == 0  # each released with its last reader


def test_the_decoder_fills_the_cache_it_is_given_whatever_transformers_calls_it():
    """transformers renamed the decoders' `past_key_values` to `cache`; an older release takes
    `cache` into its **kwargs and computes without one, so every generation would start empty."""
    model = load_base_model(None, torch.float32).model
    cache = GenerationCache(config=model.config)
    with torch.no_grad():
        final_hidden_states(model, input_ids=torch.arange(5)[None], cache=cache, use_cache=True)
    assert cache.layers[0].keys.shape[2] == 5

    class OlderDecoder(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor, past_key_values: object = None, **kwargs: object) -> None: ...

    assert cache_keyword(OlderDecoder) == "past_key_values"

"""Batched generation with a KV cache: rows of many requests and adapters decoded together.

Logits come from the same output_logits as training's, so sampled and trained logprobs agree.

Each distinct prompt (with its weights) is prefilled once, left-padded so every row's next token
sits in the last column, and its keys and values are copied to every row that starts from it
(the samples of a request, and other requests of the same prompt). A prompt that begins like one
prefilled before (kv_cache.PrefixCache) computes only what follows the whole blocks they share.
The rows' keys and values live in buffers reserved for every token they may generate
(kv_cache.ReservedLayer). Each row keeps its own weights, sampling parameters, random stream and
stop conditions; token choice is vectorised on the device with one host sync per step, and
finished rows leave the batch, their room with them, once they are an eighth of it.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tinker_server import ops
from tinker_server.worker.batching import length_buckets
from tinker_server.worker.kv_cache import (
    PREFIX_BLOCK,
    GenerationCache,
    KeptPrompt,
    PrefixCache,
    family_key,
    is_joinable,
    is_plain,
    pad_left,
)
from tinker_server.worker.lora import RowRouting, contiguous_segments
from tinker_server.worker.models import final_hidden_states, output_logits
from tinker_server.worker.transfers import to_device


@dataclass
class SampleRow:
    request_index: int
    sample_index: int
    request: ops.Sample
    weights: str | None
    """The adapter name its weights are routed by (None: the bare base model)."""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    sampling_logprobs: list[float] = field(default_factory=list)
    stopped: bool = False
    finished: bool = False
    topk_tokens: list[torch.Tensor] = field(default_factory=list)
    """[k] per generated position, when the request asked for topk_sample_logprobs."""
    topk_logprobs: list[torch.Tensor] = field(default_factory=list)


PROMPT_DRAWS_STREAM = (0, 1)
"""The random stream of a request's prompt_alt_tokens draws: a two-word key, so never a sample's."""


def stream_seed(seed: int | None, stream: tuple[int, ...]) -> int:
    """A 63-bit seed per use, derived from the request's seed: sample i uses stream (i,)."""
    if seed is None:
        return secrets.randbits(63)
    return int(np.random.SeedSequence(seed, spawn_key=stream).generate_state(1, np.uint64)[0]) & ((1 << 63) - 1)


def seeded_generator(seed: int | None, stream: tuple[int, ...], device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(stream_seed(seed, stream))


_M32 = np.uint64(0xFFFFFFFF)


def _mix32(h: np.ndarray) -> np.ndarray:
    """murmur3's finaliser on uint64 arrays holding 32-bit values (products wrap; the mask keeps the low bits)."""
    h = h ^ (h >> np.uint64(16))
    h = (h * np.uint64(0x85EBCA6B)) & _M32
    h = h ^ (h >> np.uint64(13))
    h = (h * np.uint64(0xC2B2AE35)) & _M32
    return h ^ (h >> np.uint64(16))


MIN_CANDIDATES = 256
"""The fewest of its most likely tokens a row's top-p is worked out over (see `_truncate`)."""


class _Truncation(NamedTuple):
    kept: torch.Tensor
    """[A, V] bool: the tokens each row may draw."""
    covered: torch.Tensor
    """[A] bool: whether `kept` is exact: the candidates held the row's whole truncation."""
    nucleus: torch.Tensor
    """[A]: how many candidates each truncating row kept (0 for the others)."""


def _truncate(
    scaled: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    truncating: torch.Tensor,
    candidates: int,
    with_top_k: bool = True,
) -> _Truncation:
    """What each truncating row keeps of its temperature-scaled logits [A, V]: its top k, then the
    smallest set of those, most likely first, whose probability (renormalised over the top k)
    reaches top_p, as Hugging Face and vLLM truncate. Both cuts are thresholds on the logits
    (tokens tied at a cut are all kept), so a row keeps the same tokens whatever order ties come in
    and however many candidates it is worked out over, which its batch mates decide: its
    `candidates` most likely tokens (torch.topk, linear in the vocabulary: sorting all of a real
    one costs more than a decode step on a CPU), at least its top k. They hold its top-p set
    unless their probability falls short of its top_p: `covered` says where they did. Other rows
    keep every token. `with_top_k`: whether some row has a top k (else there is no top-k cut to make)."""
    vocab = scaled.shape[-1]
    values = torch.topk(scaled, candidates, dim=-1).values  # most likely first
    limit = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
    within = limit <= candidates  # (every row with a top k: the caller asks for that many candidates)
    if with_top_k:
        kth = values.gather(-1, (limit.clamp(max=candidates) - 1)[:, None])
        kth = torch.where((limit < vocab)[:, None], kth, float("-inf"))  # the top-k cut
        in_top_k = scaled >= kth
        normaliser = torch.logsumexp(scaled.masked_fill(~in_top_k, float("-inf")), -1)  # the top k's, in any order
        probs = torch.exp(values - normaliser[:, None]).masked_fill(values < kth, 0.0)
    else:
        probs = torch.exp(values - torch.logsumexp(scaled, -1)[:, None])
    cumulative = probs.cumsum(-1)
    keep = (probs > 0) & ((cumulative - probs) < top_p[:, None])  # the probability before a token is short of top_p
    count = keep.sum(-1)
    cut = values.gather(-1, (count - 1).clamp(min=0)[:, None])  # the least likely kept token's logit
    kept = scaled >= cut
    if with_top_k:
        kept &= in_top_k
    kept |= ~truncating[:, None]
    covered = ~truncating | within | (count < candidates) | (cumulative[:, -1] >= top_p)
    return _Truncation(kept, covered, torch.where(truncating, count, 0))


def _candidate_count(largest_nucleus: int) -> int:
    """The candidates of the next step: room for twice the largest top-p set of this one (a
    row's distribution changes little from one token to the next), a power of two (few distinct
    shapes), MIN_CANDIDATES at least. A row whose candidates fell short kept all of them: the
    next step has twice as many."""
    return 1 << (max(MIN_CANDIDATES, 2 * largest_nucleus) - 1).bit_length()


class _RowParams(NamedTuple):
    """Each row's temperature, top-k and top-p."""

    temperature: np.ndarray
    top_k: np.ndarray
    top_p: np.ndarray


class TokenChoice:
    """Picks every active row's next token on the device: the argmax at temperature 0, else a draw
    from its temperature-scaled, top-k- then top-p-truncated distribution, where its cumulative
    distribution reaches a uniform of the row's own counter-based stream (its seed and sample index,
    and the step): a seeded sample is the same whatever shares its batch, on any device. One random
    number per row and step, not one per vocabulary entry: with a real vocabulary (150k tokens),
    noise per entry costs more than the draw itself. What the rows ask for and their streams live
    on the host, so that a step decides which work it needs (draws, truncation) without reading the
    device, sends the rows' numbers in one copy, and reads the device once, for the tokens chosen
    (twice in the rare step where a row's top-p set outgrows its candidates, see `_truncate`): on a
    GPU each small operation is a kernel launch, each read a stall."""

    def __init__(self, requests: list[ops.Sample], sample_indices: list[int]) -> None:
        params = [request.params for request in requests]
        self.host = _RowParams(
            np.array([p.temperature for p in params], dtype=np.float32),
            np.array([max(p.top_k, 0) for p in params], dtype=np.int64),
            np.array([p.top_p for p in params], dtype=np.float32),
        )
        self.topk_logprobs = [request.topk_sample_logprobs for request in requests]
        seeds = np.array(
            [stream_seed(p.seed, (i,)) for p, i in zip(params, sample_indices, strict=True)], dtype=np.uint64
        )
        self._keys = _mix32(_mix32(seeds & _M32) ^ (seeds >> np.uint64(32)))
        self._steps = np.zeros(len(requests), dtype=np.uint64)
        self._candidates = MIN_CANDIDATES
        """The most likely tokens per row a truncating step considers (see `_truncate`)."""

    def next(
        self, logits: torch.Tensor, active: list[int]
    ) -> tuple[torch.Tensor, list[tuple[int, float, float]], list[tuple[torch.Tensor, torch.Tensor] | None]]:
        """For rows `active` (their logits [A, V]): the tokens [A] on the device; on the host each
        one's (token, logprob, sampling logprob); and its top-k tokens and logprobs where asked."""
        temperature, top_k, top_p = (values[active] for values in self.host)
        greedy = temperature == 0
        truncating = ~greedy & ((top_k > 0) | (top_p < 1))
        uniform = self._uniform(active)
        model_logprobs = torch.log_softmax(logits, dim=-1)
        truncation = None
        if greedy.all():
            tokens = logits.argmax(dim=-1)
            sampling_logprob = torch.zeros_like(tokens, dtype=logits.dtype)
        else:
            # One copy for the step: temperature (1 where greedy), top-k, top-p, uniform, greedy, truncating.
            numbers = np.stack([np.where(greedy, 1, temperature), top_k, top_p, uniform, greedy, truncating])
            numbers = to_device(torch.from_numpy(numbers.astype(np.float32)), logits.device)
            scaled = logits if (temperature[~greedy] == 1).all() else logits / numbers[0][:, None]
            if truncating.any():
                # (a row's whole top-k is among them: only a top-p over the whole vocabulary can need more)
                candidates = min(max(self._candidates, int(top_k[truncating].max())), logits.shape[-1])
                with_top_k = bool((top_k[truncating] > 0).any())
                truncation = _truncate(scaled, numbers[1].long(), numbers[2], numbers[5].bool(), candidates, with_top_k)
                distribution = torch.log_softmax(scaled.masked_fill(~truncation.kept, float("-inf")), dim=-1)
            else:
                distribution = model_logprobs if scaled is logits else torch.log_softmax(scaled, dim=-1)
            tokens = self._draw(distribution, numbers[3])
            sampling_logprob = distribution.gather(-1, tokens[:, None]).squeeze(-1)
            if greedy.any():
                is_greedy = numbers[4].bool()
                tokens = torch.where(is_greedy, logits.argmax(dim=-1), tokens)
                sampling_logprob = sampling_logprob.masked_fill(is_greedy, 0.0)
        chosen = model_logprobs.gather(-1, tokens[:, None]).squeeze(-1)
        columns = [tokens.double(), chosen.double(), sampling_logprob.double()]
        if truncation is not None:  # (read with the tokens: whether the candidates held every truncation)
            columns += [truncation.covered.double(), truncation.nucleus.double()]
        picks = torch.stack(columns, dim=-1).tolist()  # one sync
        if truncation is not None:
            uncovered = [position for position, row in enumerate(picks) if not row[3]]
            if uncovered:  # rare: a distribution flatter than the candidates; the same draws, computed whole
                self._choose_exactly(logits, model_logprobs, numbers, uncovered, tokens, picks)
            self._candidates = _candidate_count(int(max(row[4] for row in picks)))
        top = [None] * len(active)
        if any(self.topk_logprobs[index] for index in active):
            values, ids = torch.topk(model_logprobs, max(self.topk_logprobs[index] for index in active), dim=-1)
            for position, index in enumerate(active):
                if k := self.topk_logprobs[index]:
                    top[position] = (ids[position, :k], values[position, :k])
        return tokens, [(int(token), logprob, sampled) for token, logprob, sampled, *_ in picks], top

    def _choose_exactly(
        self,
        logits: torch.Tensor,
        model_logprobs: torch.Tensor,
        numbers: torch.Tensor,
        positions: list[int],
        tokens: torch.Tensor,
        picks: list[list[float]],
    ) -> None:
        """Draws again, for the rows at `positions`, from their truncation over the whole
        vocabulary (sorted), with the same uniforms: what their candidates could not hold. Updates
        `tokens` and `picks` in place."""
        rows = to_device(torch.tensor(positions), logits.device)
        temperature, top_k, top_p, uniform = (numbers[index][rows] for index in range(4))
        scaled = logits[rows] / temperature[:, None]
        every_token = _truncate(scaled, top_k.long(), top_p, torch.ones_like(top_p, dtype=torch.bool), scaled.shape[-1])
        distribution = torch.log_softmax(scaled.masked_fill(~every_token.kept, float("-inf")), dim=-1)
        drawn = self._draw(distribution, uniform)
        tokens[rows] = drawn
        sampled = distribution.gather(-1, drawn[:, None]).squeeze(-1)
        chosen = model_logprobs[rows].gather(-1, drawn[:, None]).squeeze(-1)
        redrawn = torch.stack([drawn.double(), chosen.double(), sampled.double()], dim=-1).tolist()
        for position, row in zip(positions, redrawn, strict=True):
            picks[position][:3] = row

    def absorb(self, other: TokenChoice) -> None:
        """Takes `other`'s rows, after this one's."""
        self.host = _RowParams(*(np.concatenate(pair) for pair in zip(self.host, other.host, strict=True)))
        self._keys = np.concatenate([self._keys, other._keys])
        self._steps = np.concatenate([self._steps, other._steps])
        self.topk_logprobs = self.topk_logprobs + other.topk_logprobs
        self._candidates = max(self._candidates, other._candidates)

    @staticmethod
    def _draw(distribution: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
        """A token [A] per row of log-probabilities [A, V]: the first whose cumulative probability
        reaches the row's uniform (scaled to the row's total, which rounding leaves near 1). That
        token always has probability of its own: one truncated away adds nothing to the sum. A row
        of NaN logits (a model overflowing) finds none, and gets the last token rather than an index
        past the vocabulary (on a GPU, an assert that ends the worker's device context)."""
        cumulative = distribution.exp().cumsum(dim=-1)
        targets = uniform * cumulative[:, -1]
        return torch.searchsorted(cumulative, targets[:, None]).squeeze(-1).clamp_(max=distribution.shape[-1] - 1)

    def _uniform(self, active: list[int]) -> np.ndarray:
        """Each active row's number for its current step, from its (key, step) counter: 24 bits,
        in (0, 1]; the rows' counters move on."""
        steps = self._steps[active]
        self._steps[active] = steps + np.uint64(1)
        bits = _mix32(_mix32(self._keys[active] ^ ((steps * np.uint64(0x9E3779B1)) & _M32)))
        return ((bits >> np.uint64(8)).astype(np.float64) + 0.5) / float(1 << 24)


class _StopChecker:
    """A row's stop conditions, checked as each token arrives: its stop ids, and its stop strings
    in the text of its last few tokens only (never the whole sequence again)."""

    def __init__(
        self, params: ops.SamplingConfig, eos_token_ids: tuple[int, ...], tokenizer: PreTrainedTokenizerBase
    ) -> None:
        self.token_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            self.token_ids.update(eos_token_ids)
        self.strings = params.stop_strings
        self.tokenizer = tokenizer
        # Every token decodes to at least one byte, so a stop string of N bytes ends within the
        # last N tokens; one more covers a character whose bytes two tokens share.
        self.window = max((len(stop.encode()) for stop in self.strings), default=0) + 1

    def hit(self, tokens: list[int]) -> bool:
        if tokens[-1] in self.token_ids:
            return True
        if not self.strings:
            return False
        text = self.tokenizer.decode(tokens[-self.window :], skip_special_tokens=False)
        return any(stop in text for stop in self.strings)


@dataclass
class _Prompt:
    """One distinct (weights, prompt) of a batch: prefilled once for every row that starts from it."""

    weights: str | None
    tokens: np.ndarray
    request_indices: list[int] = field(default_factory=list)
    reuse_key: str | None = None
    """What its weights' prompts are kept and found under (None: nothing is reused)."""
    reused: KeptPrompt | None = None
    """A prompt prefilled earlier that begins like this one: its first `reused_length` positions' keys and values."""
    reused_length: int = 0

    @property
    def computed_length(self) -> int:
        return len(self.tokens) - self.reused_length


@dataclass
class _Prefill:
    """A prefill pass of `prompts`: its cache and attention mask [prompts, columns], each prompt's
    last position [prompts, 1] and next-token logits, and the prompt scores asked for (by request)."""

    prompts: list[_Prompt]
    cache: GenerationCache
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    logits: torch.Tensor
    scored: dict[int, ops.SampleResult]


def _prompt_key(weights: str | None, tokens: np.ndarray) -> tuple[str, bytes]:
    return weights or "", tokens.astype(np.int64).tobytes()


def _distinct_prompts(requests: list[ops.Sample], weights: list[str | None]) -> list[_Prompt]:
    """The batch's distinct (weights, prompt)s, weights contiguous, each with its requests in order."""
    prompts: dict[tuple[str, bytes], _Prompt] = {}
    for index, (request, routed) in enumerate(zip(requests, weights, strict=True)):
        tokens = request.prompt.astype(np.int64)
        prompts.setdefault(_prompt_key(routed, tokens), _Prompt(routed, tokens)).request_indices.append(index)
    return [prompts[key] for key in sorted(prompts)]


class _Part:
    """The requests one Generation started with: each is answered (its payload with its result) as
    soon as its own rows have finished, whatever the others still draw."""

    def __init__(
        self,
        prompts: list[_Prompt],
        scored: dict[int, ops.SampleResult],
        rows: list[SampleRow],
        payloads: Sequence[object],
    ) -> None:
        self.payloads, self._scored = payloads, scored
        self._rows: dict[int, list[SampleRow]] = {index: [] for index in range(len(payloads))}
        for row in sorted(rows, key=lambda row: (row.request_index, row.sample_index)):
            self._rows[row.request_index].append(row)
        self._cache_hits: dict[int, int] = {}
        for prompt in prompts:
            first, *others = prompt.request_indices
            self._cache_hits[first] = prompt.reused_length
            for index in others:  # the first request prefilled the prompt; these reused all of it
                self._cache_hits[index] = len(prompt.tokens)

    @property
    def unanswered(self) -> list[object]:
        return [self.payloads[index] for index in self._rows]

    def take_finished(self) -> list[tuple[object, ops.SampleResult]]:
        finished = [index for index, rows in self._rows.items() if all(row.finished for row in rows)]
        return [(self.payloads[index], self._result(index)) for index in finished]

    def _result(self, index: int) -> ops.SampleResult:
        result = self._scored.get(index, ops.SampleResult([]))
        result.prompt_cache_hit_tokens = self._cache_hits[index]
        result.sequences.extend(_sequence_arrays(row) for row in self._rows.pop(index))
        return result


UNSPLIT_PREFILL_TOKENS = 4096
"""A prefill pass takes prompts of any length while its padded tokens stay within this: each pass
launches a whole forward, which on a GPU costs its kernel launches however few its tokens (a
decode step of a 0.9B model on an H200: ~13 ms for 32 rows or 118), by estimate about what
computing a few thousand tokens of padding costs there. (On a 2-core CPU, 128 prompts of 4-64
tokens prefill in 2 passes as fast as in 5, 26% faster than in one.)"""

LEAVE_FRACTION = 1 / 8
"""Finished rows leave the batch once they are this much of it: leaving moves every other row's
keys and values, which costs about what this fraction of the batch computes in a step."""


@dataclass(frozen=True)
class SamplingModel:
    """What generations run on: the base model with its LoRA routing, on its device, and what
    ends a sequence (the tokenizer, for stop strings, and the end-of-sequence ids)."""

    model: PreTrainedModel
    routing: RowRouting
    tokenizer: PreTrainedTokenizerBase
    eos_token_ids: tuple[int, ...]
    device: torch.device
    max_prefill_tokens: int | None = None
    """Padded tokens one prefill pass takes, prompts of similar lengths together; None: a
    generation's prompts in one pass (for models whose cache rows cannot be joined)."""


class Generation:
    """Sample requests being decoded: prefilled at once, then advanced a step at a time (so the
    worker can stop between steps for other work) until every row has finished. Another
    generation's rows can join between steps (`absorb`): one batch, one forward per step.
    `weights` names what each request's weights are routed by (for a run's live weights, a private
    copy, so what later cycles do to them cannot change a generation under way); `payloads`, one per
    request, come back with their results (`take_finished`). With `prefixes`, prompts of the weights in
    `reuse_keys` start from the longest prefix kept under their key, and are kept there."""

    @torch.no_grad()
    def __init__(
        self,
        sampler: SamplingModel,
        requests: list[ops.Sample],
        weights: list[str | None],
        payloads: Sequence[object],
        prefixes: PrefixCache | None = None,
        reuse_keys: dict[str | None, str] | None = None,
    ) -> None:
        self._model, self._routing, self._device = sampler.model, sampler.routing, sampler.device
        self._max_prefill_tokens = sampler.max_prefill_tokens
        prompts = _distinct_prompts(requests, weights)
        if prefixes is not None:
            for prompt in prompts:
                if not any(_scores_prompt(requests[index]) for index in prompt.request_indices):
                    prompt.reuse_key = (reuse_keys or {}).get(prompt.weights)
        # Prompts that begin like another of the batch wait for it: later passes reuse its blocks.
        first, then = _split_on_shared_prefixes(prompts)
        passes = self._prefill_passes(first, requests, prefixes)
        if then:
            passes += self._prefill_passes(then, requests, prefixes)
        prefill = _joined_prefills(passes)
        prompts, self._cache = prefill.prompts, prefill.cache
        prompt_index = {_prompt_key(p.weights, p.tokens): index for index, p in enumerate(prompts)}
        self._rows = sorted(
            (
                SampleRow(request_index, sample_index, request, routed)
                for request_index, (request, routed) in enumerate(zip(requests, weights, strict=True))
                for sample_index in range(request.num_samples)
            ),
            key=lambda row: (row.weights or "", prompt_index[_prompt_key(row.weights, row.request.prompt)]),
        )
        self._parts = [_Part(prompts, prefill.scored, self._rows, payloads)]
        starts = torch.tensor([prompt_index[_prompt_key(row.weights, row.request.prompt)] for row in self._rows])
        starts = to_device(starts, self._device)
        self._attention_mask, self._position_ids = prefill.attention_mask[starts], prefill.position_ids[starts]
        self._padded = _has_padding(self._attention_mask)
        self._batch = list(range(len(self._rows)))  # the rows in the cache, in its order (some may have finished)
        self._cache.keep_rows(starts, self._capacity())  # every row starts from its prompt's keys and values
        self._logits = prefill.logits[starts]
        self._choice = TokenChoice([row.request for row in self._rows], [row.sample_index for row in self._rows])
        self._stops = [_StopChecker(row.request.params, sampler.eos_token_ids, sampler.tokenizer) for row in self._rows]
        self._rows_finished = True  # since `take_finished` last looked (a request may need no step at all)

    def _prefill_passes(
        self, prompts: list[_Prompt], requests: list[ops.Sample], prefixes: PrefixCache | None
    ) -> list[_Prefill]:
        """`_prefill`s of `prompts`, in passes of similar lengths within the sampler's
        `max_prefill_tokens` (padding is computed for nothing): each prompt starts from the longest
        prefix kept for its weights, and is kept there."""
        for prompt in prompts:
            if prompt.reuse_key is not None:
                prompt.reused, prompt.reused_length = prefixes.longest_prefix(prompt.reuse_key, prompt.tokens)
        lengths = [prompt.computed_length for prompt in prompts]
        buckets = (
            length_buckets(lengths, self._max_prefill_tokens, min_tokens=UNSPLIT_PREFILL_TOKENS)
            if self._max_prefill_tokens is not None
            else [list(range(len(prompts)))]
        )
        # (each pass's prompts in their order, weights together: the fewest adapter segments)
        passes = [self._prefill([prompts[index] for index in sorted(bucket)], requests) for bucket in buckets]
        if prefixes is not None and all(is_plain(layer) for layer in passes[0].cache.layers):
            for prefill in passes:
                for index, prompt in enumerate(prefill.prompts):
                    if prompt.reuse_key is not None and prefixes.wants(prompt.reuse_key, prompt.tokens):
                        columns = prefill.attention_mask[index].nonzero().squeeze(-1)
                        prefixes.keep(KeptPrompt.of_row(prefill.cache, index, columns, prompt.reuse_key, prompt.tokens))
        return passes

    def _prefill(self, prompts: list[_Prompt], requests: list[ops.Sample]) -> _Prefill:
        """One forward over what each prompt does not reuse, right-aligned after the reused
        prefixes (themselves right-aligned in the columns before)."""
        reused_width = max(prompt.reused_length for prompt in prompts)
        width = max(prompt.computed_length for prompt in prompts)
        input_ids = torch.zeros((len(prompts), width), dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), reused_width + width), dtype=torch.long)
        position_ids = torch.zeros((len(prompts), width), dtype=torch.long)
        for index, prompt in enumerate(prompts):
            computed = prompt.computed_length
            input_ids[index, width - computed :] = torch.from_numpy(prompt.tokens[prompt.reused_length :])
            attention_mask[index, reused_width - prompt.reused_length : reused_width] = 1
            attention_mask[index, reused_width + width - computed :] = 1
            position_ids[index, width - computed :] = torch.arange(prompt.reused_length, len(prompt.tokens))
        input_ids, attention_mask, position_ids = (
            to_device(t, self._device) for t in (input_ids, attention_mask, position_ids)
        )
        cache = GenerationCache(config=self._model.config)
        if reused_width:
            _load_prefixes(cache, prompts, reused_width)
        with self._routing.route(contiguous_segments([prompt.weights for prompt in prompts])):
            hidden = final_hidden_states(
                self._model,
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=True,
            )
            logits = output_logits(self._model, hidden[:, -1:])[:, -1]
        scored = self._score_prompts(hidden, input_ids, prompts, requests)
        return _Prefill(prompts, cache, attention_mask, position_ids[:, -1:], logits, scored)

    def _score_prompts(
        self, hidden: torch.Tensor, input_ids: torch.Tensor, prompts: list[_Prompt], requests: list[ops.Sample]
    ) -> dict[int, ops.SampleResult]:
        """Per request with a prompt option: a result holding what it asked about its prompt (no
        sequences yet), from its prompt's prefill. Logits over the vocabulary are computed for one
        scored prompt at a time (a whole batch's at once can take more memory than the model)."""
        scored: dict[int, ops.SampleResult] = {}
        width = input_ids.shape[1]
        for prompt_index, prompt in enumerate(prompts):
            scoring = [index for index in prompt.request_indices if _scores_prompt(requests[index])]
            if not scoring:
                continue
            start = width - len(prompt.tokens)  # a scored prompt reuses nothing: all of it is in input_ids
            with self._routing.route(contiguous_segments([prompt.weights])):  # its row alone
                row_logits = output_logits(self._model, hidden[prompt_index : prompt_index + 1, start : width - 1])[0]
            row_logprobs = torch.log_softmax(row_logits, dim=-1)  # [P-1, V]: row i predicts prompt[i + 1]
            for index in scoring:
                request = requests[index]
                result = ops.SampleResult([])
                if request.include_prompt_logprobs or request.topk_prompt_logprobs:
                    result.prompt = _prompt_logprobs(row_logprobs, input_ids[prompt_index, start + 1 : width], request)
                if request.target_prompt_logprobs is not None:
                    result.target_prompt_logprobs = _target_logprobs(row_logprobs, request.target_prompt_logprobs)
                if request.prompt_alt_tokens_k:
                    result.prompt_alt_tokens, result.prompt_alt_logprobs = _draw_alternatives(
                        row_logits, row_logprobs, request
                    )
                scored[index] = result
        return scored

    def _capacity(self) -> int:
        """Positions the active rows' cache needs: those so far, and every token they may still generate."""
        return self._attention_mask.shape[1] + self._remaining()

    def _remaining(self) -> int:
        rows = [self._rows[index] for index in self._batch]
        return max((row.request.params.max_tokens - len(row.tokens) for row in rows if not row.finished), default=0)

    @property
    def batch_rows(self) -> int:
        """Rows in the cache (unfinished ones, and finished ones yet to leave)."""
        return len(self._batch)

    def joined_positions(self, other: Generation) -> int:
        """The positions each row of this batch would reserve with `other`'s rows joined."""
        columns = max(self._attention_mask.shape[1], other._attention_mask.shape[1])
        return columns + max(self._remaining(), other._remaining())

    @property
    def reserved_bytes(self) -> int:
        return self._cache.reserved_bytes

    @property
    def done(self) -> bool:
        return not self._batch

    def can_absorb(self, other: Generation) -> bool:
        """Rows join where every cache layer can take another batch's rows."""
        return all(is_joinable(layer) for layer in (*self._cache.layers, *other._cache.layers))

    def absorb(self, other: Generation) -> None:
        """Takes `other`'s unfinished rows into this batch, after this one's: the shorter of the two
        caches is left-padded (and masked) to the other's length, so every row's next token still
        sits in the last column."""
        offset = len(self._rows)
        self._rows = self._rows + other._rows
        self._batch = self._batch + [offset + index for index in other._batch]
        self._stops = self._stops + other._stops
        self._choice.absorb(other._choice)
        self._parts = self._parts + other._parts
        length = max(self._attention_mask.shape[1], other._attention_mask.shape[1])
        self._attention_mask = torch.cat(
            [pad_left(self._attention_mask, length, 1), pad_left(other._attention_mask, length, 1)]
        )
        self._padded = _has_padding(self._attention_mask)
        self._cache.join([other._cache], self._capacity())
        self._position_ids = torch.cat([self._position_ids, other._position_ids])
        self._logits = torch.cat([self._logits, other._logits])
        self._rows_finished |= other._rows_finished

    def unanswered(self) -> list[object]:
        """The payloads of the requests not answered yet."""
        return [payload for part in self._parts for payload in part.unanswered]

    def take_finished(self) -> list[tuple[object, ops.SampleResult]]:
        """The payload and result of every request whose rows have all finished, once each."""
        if not self._rows_finished:  # (every part's rows are checked only after a step that finished some)
            return []
        self._rows_finished = False
        finished = [answer for part in self._parts for answer in part.take_finished()]
        self._parts = [part for part in self._parts if part.unanswered]
        return finished

    @torch.no_grad()
    def step(self) -> None:
        """Chooses every unfinished row's next token and takes them one position further.
        Finished rows leave the batch once they are a LEAVE_FRACTION of it: until then they ride
        along, their outputs unread (their weights copy may be gone: routing reads a missing
        adapter as the base model)."""
        rows, batch = self._rows, self._batch
        live = [position for position, index in enumerate(batch) if not rows[index].finished]
        live_positions = to_device(torch.tensor(live), self._device) if len(live) < len(batch) else None
        logits = self._logits if live_positions is None else self._logits[live_positions]
        tokens, picks, top = self._choice.next(logits, [batch[position] for position in live])
        for position, (token, logprob, sampling_logprob) in enumerate(picks):
            index = batch[live[position]]
            row = rows[index]
            row.tokens.append(token)
            row.logprobs.append(logprob)
            row.sampling_logprobs.append(sampling_logprob)
            if top[position] is not None:
                row.topk_tokens.append(top[position][0])
                row.topk_logprobs.append(top[position][1])
            if self._stops[index].hit(row.tokens):
                row.stopped = row.finished = True
            elif len(row.tokens) >= row.request.params.max_tokens:
                row.finished = True
            self._rows_finished |= row.finished
        if live_positions is not None:  # finished rows are fed any token: what they compute is never read
            tokens = tokens.new_zeros(len(batch)).index_copy_(0, live_positions, tokens)
        keep = [position for position, index in enumerate(batch) if not rows[index].finished]
        if not keep:
            self._batch, self._cache = [], GenerationCache()  # nothing left to decode: the memory goes back
            return
        if len(batch) - len(keep) >= LEAVE_FRACTION * len(batch):
            kept = to_device(torch.tensor(keep), self._device)
            self._attention_mask, self._position_ids, tokens = (
                self._attention_mask[kept],
                self._position_ids[kept],
                tokens[kept],
            )
            self._batch = batch = [batch[position] for position in keep]
            self._padded = self._padded and _has_padding(self._attention_mask)
            self._cache.keep_rows(kept, self._capacity())
        self._attention_mask = torch.cat([self._attention_mask, self._attention_mask.new_ones((len(batch), 1))], 1)
        self._position_ids = self._position_ids + 1
        segments = contiguous_segments([rows[index].weights for index in batch])
        with self._routing.route(segments):
            hidden = final_hidden_states(
                self._model,
                input_ids=tokens[:, None],
                attention_mask=self._attention_mask if self._padded else None,
                position_ids=self._position_ids,
                cache=self._cache,
                use_cache=True,
            )
            self._logits = output_logits(self._model, hidden)[:, -1]


def _has_padding(attention_mask: torch.Tensor) -> bool:
    """Whether some row has a masked column: only then does a step pass its mask to the model,
    which otherwise reads the device at every step to find that nothing is masked. (This read
    happens only as a generation starts, and as rows join or leave it.)"""
    return not bool(attention_mask.all())


def _split_on_shared_prefixes(prompts: list[_Prompt]) -> tuple[list[_Prompt], list[_Prompt]]:
    """The prompts to prefill first, and those sharing a whole block with one of them (same
    weights key), to prefill after it from its keys and values."""
    first: list[_Prompt] = []
    then: list[_Prompt] = []
    families: set[tuple[str, bytes]] = set()  # of `first`'s prompts: a shared whole block is a shared first block
    for prompt in prompts:
        family = None if prompt.reuse_key is None else family_key(prompt.reuse_key, prompt.tokens)
        if family is not None and len(prompt.tokens) > PREFIX_BLOCK and family in families:
            then.append(prompt)
        else:
            first.append(prompt)
            if family is not None:
                families.add(family)
    return first, then


def _joined_prefills(passes: list[_Prefill]) -> _Prefill:
    """The passes' prompts one after another in the first pass's cache, the shorter columns
    left-padded (and masked)."""
    first, *others = passes
    if not others:
        return first
    width = max(prefill.attention_mask.shape[1] for prefill in passes)
    first.cache.join([prefill.cache for prefill in others], width)
    return _Prefill(
        [prompt for prefill in passes for prompt in prefill.prompts],
        first.cache,
        torch.cat([pad_left(prefill.attention_mask, width, 1) for prefill in passes]),
        torch.cat([prefill.position_ids for prefill in passes]),
        torch.cat([prefill.logits for prefill in passes]),
        {index: result for prefill in passes for index, result in prefill.scored.items()},
    )


def _load_prefixes(cache: GenerationCache, prompts: list[_Prompt], width: int) -> None:
    """Puts each prompt's reused keys and values in the last of `width` columns (zeros before)."""
    donors = [(index, prompt) for index, prompt in enumerate(prompts) if prompt.reused is not None]
    template = donors[0][1].reused
    for layer_index, layer in enumerate(cache.layers):
        heads, _, dim = template.keys[layer_index].shape
        keys = template.keys[layer_index].new_zeros((len(prompts), heads, width, dim))
        values = template.values[layer_index].new_zeros((len(prompts), heads, width, dim))
        for index, prompt in donors:
            length = prompt.reused_length
            keys[index, :, width - length :] = prompt.reused.keys[layer_index][:, :length]
            values[index, :, width - length :] = prompt.reused.values[layer_index][:, :length]
        layer.update(keys, values)


def _sequence_arrays(row: SampleRow) -> ops.SequenceArrays:
    sequence = ops.SequenceArrays(
        sequence_id=f"seq-{secrets.token_hex(12)}",
        tokens=np.asarray(row.tokens, dtype=np.int32),
        logprobs=np.asarray(row.logprobs, dtype=np.float32),
        sampling_logprobs=np.asarray(row.sampling_logprobs, dtype=np.float32),
        stopped=row.stopped,
    )
    if row.topk_tokens:
        sequence.topk_tokens = torch.stack(row.topk_tokens).cpu().numpy().astype(np.int32)
        sequence.topk_logprobs = torch.stack(row.topk_logprobs).cpu().numpy().astype(np.float32)
    return sequence


def _scores_prompt(request: ops.Sample) -> bool:
    return bool(
        request.include_prompt_logprobs
        or request.topk_prompt_logprobs
        or request.target_prompt_logprobs is not None
        or request.prompt_alt_tokens_k
    )


def _prompt_logprobs(logprobs: torch.Tensor, targets: torch.Tensor, request: ops.Sample) -> ops.PromptLogprobs:
    """log p(prompt[i] | prompt[:i]) and the top k, for the last N positions (all but the first
    by default); the positions before them are NaN / -1."""
    scored = request.prompt_logprobs_last_n or len(targets)
    unscored = len(targets) + 1 - scored
    tail = logprobs[len(targets) - scored :]
    picked = tail.gather(-1, targets[-scored:, None]).squeeze(-1)
    prompt = ops.PromptLogprobs(_after_fill(np.nan, unscored, picked).astype(np.float32), None, None)
    if k := request.topk_prompt_logprobs:
        values, tokens = torch.topk(tail, k, dim=-1)
        prompt.topk_tokens = _after_fill(-1, unscored, tokens).astype(np.int32)
        prompt.topk_logprobs = _after_fill(np.nan, unscored, values).astype(np.float32)
    return prompt


def _after_fill(fill: float, count: int, values: torch.Tensor) -> np.ndarray:
    """`count` rows of `fill`, then `values`."""
    return np.concatenate([np.full((count, *values.shape[1:]), fill), values.cpu().numpy()])


def _target_logprobs(logprobs: torch.Tensor, targets: np.ndarray) -> np.ndarray:
    """The log-probability of each requested id at its prompt position; 0 where the request has -1."""
    ids = torch.tensor(targets, device=logprobs.device)
    picked = logprobs.gather(-1, ids.clamp(min=0))
    return torch.where(ids >= 0, picked, 0.0).cpu().numpy().astype(np.float32)


def _draw_alternatives(
    logits: torch.Tensor, logprobs: torch.Tensor, request: ops.Sample
) -> tuple[np.ndarray, np.ndarray]:
    """k independent draws per prompt position at the request's temperature (all the argmax at 0),
    and the model's own log-probability of each: int32 and float32 [P-1, k]."""
    k, temperature = request.prompt_alt_tokens_k, request.params.temperature
    if temperature == 0:
        tokens = logprobs.argmax(dim=-1, keepdim=True).expand(-1, k)
    else:
        generator = seeded_generator(request.params.seed, PROMPT_DRAWS_STREAM, logits.device)
        probs = torch.softmax(logits / temperature, dim=-1)
        tokens = torch.multinomial(probs, k, replacement=True, generator=generator)
    picked = logprobs.gather(-1, tokens)
    return tokens.cpu().numpy().astype(np.int32), picked.cpu().numpy().astype(np.float32)

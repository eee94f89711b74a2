"""Batched generation with a KV cache: rows of many requests and adapters decoded together.

Prompts are left-padded so every row's next token sits in the last column; each row
keeps its own adapter, sampling parameters, random stream and stop conditions.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from tinker_server import ops
from tinker_server.worker.lora import RowRouting, contiguous_segments
from tinker_server.worker.models import final_hidden_states, output_logits


@dataclass
class SampleRow:
    request_index: int
    sample_index: int
    request: ops.Sample
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


def seeded_generator(seed: int | None, stream: tuple[int, ...], device: torch.device) -> torch.Generator:
    """One independent random stream per use, derived from the request's seed: sample i uses (i,)."""
    if seed is None:
        state = secrets.randbits(63)
    else:
        state = int(np.random.SeedSequence(seed, spawn_key=stream).generate_state(1, np.uint64)[0])
    return torch.Generator(device=device).manual_seed(state & ((1 << 63) - 1))


def sampling_distribution(logits: torch.Tensor, params: ops.SamplingConfig) -> torch.Tensor:
    """Log-probabilities [V] of the distribution actually sampled from (temperature > 0)."""
    scaled = logits / params.temperature
    if 0 < params.top_k < scaled.shape[-1]:
        values, indices = torch.topk(scaled, params.top_k)
        scaled = torch.full_like(scaled, float("-inf")).scatter(-1, indices, values)
    if params.top_p < 1.0:
        probs = torch.softmax(scaled, dim=-1)
        sorted_probs, order = torch.sort(probs, descending=True)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        drop_sorted = mass_before >= params.top_p  # keeps the smallest set reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return torch.log_softmax(scaled, dim=-1)


class _StopChecker:
    def __init__(
        self, params: ops.SamplingConfig, eos_token_ids: tuple[int, ...], tokenizer: PreTrainedTokenizerBase
    ) -> None:
        self.token_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            self.token_ids.update(eos_token_ids)
        self.strings = params.stop_strings
        self.tokenizer = tokenizer

    def hit(self, tokens: list[int]) -> bool:
        if tokens[-1] in self.token_ids:
            return True
        if not self.strings:
            return False
        text = self.tokenizer.decode(tokens, skip_special_tokens=False)
        return any(stop in text for stop in self.strings)


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    routing: RowRouting,
    tokenizer: PreTrainedTokenizerBase,
    eos_token_ids: tuple[int, ...],
    device: torch.device,
    requests: list[ops.Sample],
    rows: list[SampleRow],
) -> list[ops.SampleResult]:
    """Logits come from the same output_logits as training's, so sampled and trained logprobs agree."""
    rows = sorted(rows, key=lambda row: row.request.adapter or "")
    segments = contiguous_segments([row.request.adapter for row in rows])
    prompt_width = max(len(row.request.prompt) for row in rows)
    input_ids = torch.zeros((len(rows), prompt_width), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), prompt_width), dtype=torch.long)
    for index, row in enumerate(rows):
        prompt = torch.from_numpy(row.request.prompt.astype(np.int64))
        input_ids[index, prompt_width - len(prompt) :] = prompt
        attention_mask[index, prompt_width - len(prompt) :] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    generators = [seeded_generator(row.request.params.seed, (row.sample_index,), device) for row in rows]
    stops = [_StopChecker(row.request.params, eos_token_ids, tokenizer) for row in rows]
    want_prompt_scores = any(_scores_prompt(request) for request in requests)

    cache = DynamicCache(config=model.config)
    with routing.route(segments):
        hidden = final_hidden_states(
            model,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
        )
        scored = (
            _score_prompts(output_logits(model, hidden), input_ids, rows, prompt_width) if want_prompt_scores else {}
        )
        logits = output_logits(model, hidden[:, -1:])[:, -1]
        while True:
            next_tokens = _choose_tokens(logits, rows, generators, stops)
            if all(row.finished for row in rows):
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(rows), 1))], dim=1)
            position_ids = position_ids[:, -1:] + 1
            hidden = final_hidden_states(
                model,
                input_ids=next_tokens[:, None],
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=True,
            )
            logits = output_logits(model, hidden)[:, -1]

    results = [scored.get(index, ops.SampleResult([])) for index in range(len(requests))]
    for row in sorted(rows, key=lambda row: (row.request_index, row.sample_index)):
        results[row.request_index].sequences.append(_sequence_arrays(row))
    return results


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


def _choose_tokens(
    logits: torch.Tensor,
    rows: list[SampleRow],
    generators: list[torch.Generator],
    stops: list[_StopChecker],
) -> torch.Tensor:
    """Picks each unfinished row's next token and records its logprobs; [B] token ids."""
    model_logprobs = torch.log_softmax(logits, dim=-1)
    next_tokens = torch.zeros(len(rows), dtype=torch.long, device=logits.device)
    for index, row in enumerate(rows):
        if row.finished:
            continue
        params = row.request.params
        if params.temperature == 0:
            token = int(torch.argmax(logits[index]))
            sampling_logprob = 0.0
        else:
            distribution = sampling_distribution(logits[index], params)
            token = int(torch.multinomial(distribution.exp(), 1, generator=generators[index]))
            sampling_logprob = float(distribution[token])
        row.tokens.append(token)
        row.logprobs.append(float(model_logprobs[index, token]))
        row.sampling_logprobs.append(sampling_logprob)
        if k := row.request.topk_sample_logprobs:
            values, tokens = torch.topk(model_logprobs[index], k)
            row.topk_tokens.append(tokens)
            row.topk_logprobs.append(values)
        next_tokens[index] = token
        if stops[index].hit(row.tokens):
            row.stopped = row.finished = True
        elif len(row.tokens) >= params.max_tokens:
            row.finished = True
    return next_tokens


def _scores_prompt(request: ops.Sample) -> bool:
    return bool(
        request.include_prompt_logprobs
        or request.topk_prompt_logprobs
        or request.target_prompt_logprobs is not None
        or request.prompt_alt_tokens_k
    )


def _score_prompts(
    logits: torch.Tensor, input_ids: torch.Tensor, rows: list[SampleRow], width: int
) -> dict[int, ops.SampleResult]:
    """Per request with a prompt option: a result holding what it asked about its prompt (no sequences yet)."""
    scored: dict[int, ops.SampleResult] = {}
    for index, row in enumerate(rows):
        request = row.request
        if row.request_index in scored or not _scores_prompt(request):
            continue
        start = width - len(request.prompt)
        row_logits = logits[index, start : width - 1]  # [P-1, V]: row i predicts prompt[i + 1]
        row_logprobs = torch.log_softmax(row_logits, dim=-1)
        result = ops.SampleResult([])
        if request.include_prompt_logprobs or request.topk_prompt_logprobs:
            result.prompt = _prompt_logprobs(row_logprobs, input_ids[index, start + 1 : width], request)
        if request.target_prompt_logprobs is not None:
            result.target_prompt_logprobs = _target_logprobs(row_logprobs, request.target_prompt_logprobs)
        if request.prompt_alt_tokens_k:
            result.prompt_alt_tokens, result.prompt_alt_logprobs = _draw_alternatives(row_logits, row_logprobs, request)
        scored[row.request_index] = result
    return scored


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

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


def row_generator(seed: int | None, sample_index: int, device: torch.device) -> torch.Generator:
    """One independent stream per sample, derived from the request's seed."""
    if seed is None:
        state = secrets.randbits(63)
    else:
        state = int(np.random.SeedSequence(seed, spawn_key=(sample_index,)).generate_state(1, np.uint64)[0])
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
        self, params: ops.SamplingConfig, eos_token_id: int | None, tokenizer: PreTrainedTokenizerBase
    ) -> None:
        self.token_ids = set(params.stop_token_ids)
        if not params.ignore_eos and eos_token_id is not None:
            self.token_ids.add(eos_token_id)
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
    device: torch.device,
    requests: list[ops.Sample],
    rows: list[SampleRow],
) -> list[ops.SampleResult]:
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
    generators = [row_generator(row.request.params.seed, row.sample_index, device) for row in rows]
    stops = [_StopChecker(row.request.params, tokenizer.eos_token_id, tokenizer) for row in rows]
    want_prompt_logprobs = any(request.include_prompt_logprobs or request.topk_prompt_logprobs for request in requests)

    cache = DynamicCache(config=model.config)
    with routing.route(segments):
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            logits_to_keep=0 if want_prompt_logprobs else 1,
        )
        prompt_logprobs = _prompt_logprobs(out.logits, input_ids, rows, prompt_width) if want_prompt_logprobs else {}
        logits = out.logits[:, -1].float()
        while True:
            next_tokens = _choose_tokens(logits, rows, generators, stops)
            if all(row.finished for row in rows):
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(rows), 1))], dim=1)
            position_ids = position_ids[:, -1:] + 1
            out = model(
                input_ids=next_tokens[:, None],
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=True,
            )
            logits = out.logits[:, -1].float()

    results = [ops.SampleResult([], prompt_logprobs.get(index)) for index in range(len(requests))]
    for row in sorted(rows, key=lambda row: (row.request_index, row.sample_index)):
        results[row.request_index].sequences.append(
            ops.SequenceArrays(
                tokens=np.asarray(row.tokens, dtype=np.int32),
                logprobs=np.asarray(row.logprobs, dtype=np.float32),
                sampling_logprobs=np.asarray(row.sampling_logprobs, dtype=np.float32),
                stopped=row.stopped,
            )
        )
    return results


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
        next_tokens[index] = token
        if stops[index].hit(row.tokens):
            row.stopped = row.finished = True
        elif len(row.tokens) >= params.max_tokens:
            row.finished = True
    return next_tokens


def _prompt_logprobs(
    logits: torch.Tensor, input_ids: torch.Tensor, rows: list[SampleRow], width: int
) -> dict[int, ops.PromptLogprobs]:
    """Per request that asked: log p(prompt[i] | prompt[:i]) (NaN at i = 0), and the top k."""
    found: dict[int, ops.PromptLogprobs] = {}
    for index, row in enumerate(rows):
        request = row.request
        if not (request.include_prompt_logprobs or request.topk_prompt_logprobs) or row.request_index in found:
            continue
        start = width - len(request.prompt)
        row_logprobs = torch.log_softmax(logits[index, start : width - 1].float(), dim=-1)  # [P-1, V]
        targets = input_ids[index, start + 1 : width]
        picked = row_logprobs.gather(-1, targets[:, None]).squeeze(-1).cpu().numpy()
        prompt = ops.PromptLogprobs(np.concatenate([[np.nan], picked]).astype(np.float32), None, None)
        if k := request.topk_prompt_logprobs:
            values, tokens = torch.topk(row_logprobs, k, dim=-1)
            prompt.topk_tokens = np.concatenate([np.full((1, k), -1), tokens.cpu().numpy()]).astype(np.int32)
            prompt.topk_logprobs = np.concatenate([np.full((1, k), np.nan), values.cpu().numpy()]).astype(np.float32)
        found[row.request_index] = prompt
    return found

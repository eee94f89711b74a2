"""The keys and values of generations: reserved up front, counted against a memory budget, and
kept for the prompts of later requests.

A generation's plain attention layers hold their keys and values in buffers with room for every
token its rows may still generate (`ReservedLayer`): a decode step writes its column in place
instead of copying the whole cache to grow it. Layers of other kinds (sliding windows, recurrent
state) keep Hugging Face's own classes. What generations reserve (with the weights copies they
read, counted by the decoder), and the prompts kept for reuse (`PrefixCache`), stay within one
budget (`KvBudget`): kept prompts give way first, then requests wait for rows to finish.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from tinker_server.worker.lora import RowRouting, contiguous_segments
from tinker_server.worker.models import final_hidden_states

CPU_KV_CACHE_BYTES = 4 << 30
"""The budget on a CPU, where the cache shares host memory with everything else."""

PREFIX_BLOCK = 16
"""Prompts are reused in whole blocks of this many tokens (as vLLM does): a hit means a shared
prefix, never a chance match of a first token or two."""


class ReservedLayer(DynamicLayer):
    """A plain attention layer's keys and values [rows, heads, length, dim], views of buffers
    with room for `capacity` positions."""

    def __init__(self, parts: list[tuple[torch.Tensor, torch.Tensor]], capacity: int) -> None:
        """The rows of `parts` (keys and values each), one after another, each right-aligned to
        the longest (zeros before: the caller masks them)."""
        super().__init__()
        keys, values = parts[0]
        self.device, self.is_initialized = keys.device, True
        rows = sum(part_keys.shape[0] for part_keys, _ in parts)
        length = max(part_keys.shape[2] for part_keys, _ in parts)
        room = max(capacity, length)
        self._key_buffer = keys.new_empty((rows, keys.shape[1], room, keys.shape[3]))
        self._value_buffer = values.new_empty((rows, values.shape[1], room, values.shape[3]))
        start = 0
        for part_keys, part_values in parts:
            end, pad = start + part_keys.shape[0], length - part_keys.shape[2]
            self._key_buffer[start:end, :, :pad] = 0
            self._value_buffer[start:end, :, :pad] = 0
            self._key_buffer[start:end, :, pad:length] = part_keys
            self._value_buffer[start:end, :, pad:length] = part_values
            start = end
        self._expose(rows, length)

    @property
    def capacity(self) -> int:
        return self._key_buffer.shape[2]

    @property
    def reserved_bytes(self) -> int:
        return self._key_buffer.nbytes + self._value_buffer.nbytes

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows, _, start, _ = self.keys.shape
        end = start + key_states.shape[2]
        if end > self.capacity:  # more than was reserved: grow, doubling (not reached when reserved right)
            self.__init__([(self.keys, self.values)], max(end, 2 * self.capacity))
        self._key_buffer[:rows, :, start:end] = key_states
        self._value_buffer[:rows, :, start:end] = value_states
        self._expose(rows, end)
        return self.keys, self.values

    def keep_rows(
        self, rows: torch.Tensor, capacity: int, spare: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Keeps `rows`, in that order, with room for `capacity` positions: gathered into `spare`
        buffers (allocated if it has none of the right shape), whose place the old buffers take
        in what it returns, so layer after layer and step after step nothing is allocated. The
        buffers are reallocated only to grow, or once they are more than half empty."""
        if capacity > self.capacity or 2 * len(rows) * capacity < self._key_buffer.shape[0] * self.capacity:
            self.__init__([(self.keys[rows], self.values[rows])], capacity)
            return spare
        if spare is None or spare[0].shape != self._key_buffer.shape or spare[1].shape != self._value_buffer.shape:
            spare = (torch.empty_like(self._key_buffer), torch.empty_like(self._value_buffer))
        length = self.keys.shape[2]
        torch.index_select(self.keys, 0, rows, out=spare[0][: len(rows), :, :length])
        torch.index_select(self.values, 0, rows, out=spare[1][: len(rows), :, :length])
        freed = self._key_buffer, self._value_buffer
        self._key_buffer, self._value_buffer = spare
        self._expose(len(rows), length)
        return freed

    def _expose(self, rows: int, length: int) -> None:
        self.keys, self.values = self._key_buffer[:rows, :, :length], self._value_buffer[:rows, :, :length]


def is_plain(layer: object) -> bool:
    return type(layer) is DynamicLayer or isinstance(layer, ReservedLayer)


def is_joinable(layer: object) -> bool:
    """Layers whose rows can join another batch's: plain ones, and sliding windows (each keeps the
    last positions of the shared columns)."""
    return is_plain(layer) or type(layer) is DynamicSlidingWindowLayer


class GenerationCache(DynamicCache):
    """A generation's cache: Hugging Face's, whose plain attention layers become `ReservedLayer`s
    once its rows are known (`keep_rows`). One spare pair of buffers, passed from layer to layer,
    lets rows leave without an allocation (a fresh one costs more than the move itself on a CPU)."""

    def __init__(self, config: PretrainedConfig | None = None) -> None:
        super().__init__(config=config)
        self._spare: tuple[torch.Tensor, torch.Tensor] | None = None

    def keep_rows(self, rows: torch.Tensor, capacity: int) -> None:
        """Keeps only `rows` (in that order) of every layer; plain layers get room for `capacity` positions."""
        for index, layer in enumerate(self.layers):
            if isinstance(layer, ReservedLayer):
                self._spare = layer.keep_rows(rows, capacity, self._spare)
            elif is_plain(layer):
                self.layers[index] = ReservedLayer([(layer.keys[rows], layer.values[rows])], capacity)
            else:
                layer.reorder_cache(rows)

    def join(self, others: list[DynamicCache], capacity: int) -> None:
        """Appends the rows of `others`, in order, to these (joinable layers only): the shorter are
        left-padded with zeros (masked by the caller), so every row's latest position stays in the
        last column."""
        for index, mine in enumerate(self.layers):
            layers = [mine, *(other.layers[index] for other in others)]
            if is_plain(mine):
                self.layers[index] = ReservedLayer([(layer.keys, layer.values) for layer in layers], capacity)
            else:  # a sliding window: its last positions, right-aligned like the columns they end
                length = max(layer.keys.shape[2] for layer in layers)
                mine.keys = torch.cat([pad_left(layer.keys, length, 2) for layer in layers])
                mine.values = torch.cat([pad_left(layer.values, length, 2) for layer in layers])
                mine.cumulative_length = max(layer.cumulative_length for layer in layers)
        self._spare = None  # the rows' shape changed

    @property
    def reserved_bytes(self) -> int:
        """What the layers hold, and the spare pair: counted from the start (rows leaving allocate it
        later, and it must not take the budget past its total then)."""
        layers = [layer for layer in self.layers if layer.is_initialized]
        reserved = [layer.reserved_bytes for layer in layers if isinstance(layer, ReservedLayer)]
        spare = sum(tensor.nbytes for tensor in self._spare) if self._spare is not None else max(reserved, default=0)
        others = sum(
            layer.keys.nbytes + layer.values.nbytes for layer in layers if not isinstance(layer, ReservedLayer)
        )
        return sum(reserved) + others + spare


def pad_left(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """Zeros before `tensor` along `dim`, up to `length`."""
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def reuses_prompts(config: PretrainedConfig) -> bool:
    """Whether the model's prompts can be kept and reused: every cache layer a plain one (a
    sliding window keeps too little of a long prompt)."""
    return all(type(layer) is DynamicLayer for layer in GenerationCache(config=config).layers)


def joins_rows(config: PretrainedConfig) -> bool:
    """Whether caches of the model can take another's rows: every layer a joinable one."""
    return all(is_joinable(layer) for layer in GenerationCache(config=config).layers)


def default_kv_cache_bytes(device: torch.device) -> int:
    """Half the GPU memory still free with the model loaded (adapters, optimizer state and
    training's activations need the rest), or CPU_KV_CACHE_BYTES on a CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    return CPU_KV_CACHE_BYTES


@torch.no_grad()
def kv_bytes_per_token(model: PreTrainedModel, routing: RowRouting, device: torch.device) -> int:
    """What one row's cache reserves per position, measured on one token held as a generation holds
    it (any architecture's layout)."""
    cache = GenerationCache(config=model.config)
    with routing.route(contiguous_segments([None])):
        final_hidden_states(model, input_ids=torch.zeros((1, 1), dtype=torch.long, device=device), cache=cache)
    cache.keep_rows(torch.zeros(1, dtype=torch.long, device=device), capacity=1)
    return cache.reserved_bytes


@dataclass(eq=False)
class KeptPrompt:
    """A prompt's keys and values per layer, [heads, length, dim] each, kept under the key of the
    weights that computed them (the base model: ''; a sampler snapshot: its name)."""

    key: str
    tokens: np.ndarray
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @classmethod
    def of_row(cls, cache: DynamicCache, row: int, columns: torch.Tensor, key: str, tokens: np.ndarray) -> KeptPrompt:
        """A copy of the prompt in `columns` of the cache's `row`."""
        keys = [layer.keys[row][:, columns] for layer in cache.layers]
        return cls(key, tokens, keys, [layer.values[row][:, columns] for layer in cache.layers])

    @property
    def nbytes(self) -> int:
        return sum(tensor.nbytes for tensor in (*self.keys, *self.values))


class PrefixCache:
    """Prompts prefilled lately, per weights key, for later prompts that start the same way. Least
    recently used ones leave first; `forget` drops the prompts of weights that changed. Prompts
    are found through their first block (any reuse shares it), not by comparing with every one."""

    def __init__(self) -> None:
        self._kept: OrderedDict[int, KeptPrompt] = OrderedDict()
        self._families: dict[tuple[str, bytes], dict[int, KeptPrompt]] = {}
        self.nbytes = 0

    def longest_prefix(self, key: str, tokens: np.ndarray) -> tuple[KeptPrompt | None, int]:
        """The kept prompt sharing the most whole blocks with `tokens` (leaving at least its last
        token to compute), and how many tokens they share."""
        best, best_length = None, 0
        for kept in self._family(key, tokens).values():
            length = _reusable_length(kept.tokens, tokens)
            if length > best_length:
                best, best_length = kept, length
        if best is not None:
            self._kept.move_to_end(id(best))
        return best, best_length

    def wants(self, key: str, tokens: np.ndarray) -> bool:
        """Whether keeping this prompt adds anything: a whole block, and no kept prompt begins with it."""
        return len(tokens) > PREFIX_BLOCK and not any(
            _common_prefix(kept.tokens, tokens) == len(tokens) for kept in self._family(key, tokens).values()
        )

    def keep(self, prompt: KeptPrompt) -> None:
        """Keeps `prompt` (which `wants` it) in place of the kept prompts it begins with."""
        for kept in list(self._family(prompt.key, prompt.tokens).values()):
            if _common_prefix(kept.tokens, prompt.tokens) == len(kept.tokens):
                self._drop(kept)
        self._kept[id(prompt)] = prompt
        self._families.setdefault(family_key(prompt.key, prompt.tokens), {})[id(prompt)] = prompt
        self.nbytes += prompt.nbytes

    def forget(self, key: str) -> None:
        for kept in [kept for kept in self._kept.values() if kept.key == key]:
            self._drop(kept)

    def shrink_to(self, nbytes: int) -> None:
        """Drops least recently used prompts until at most `nbytes` are kept."""
        while self._kept and self.nbytes > nbytes:
            self._drop(next(iter(self._kept.values())))

    def _family(self, key: str, tokens: np.ndarray) -> dict[int, KeptPrompt]:
        return self._families.get(family_key(key, tokens), {}) if len(tokens) > PREFIX_BLOCK else {}

    def _drop(self, kept: KeptPrompt) -> None:
        del self._kept[id(kept)]
        key = family_key(kept.key, kept.tokens)
        family = self._families[key]
        del family[id(kept)]
        if not family:
            del self._families[key]
        self.nbytes -= kept.nbytes


def family_key(key: str, tokens: np.ndarray) -> tuple[str, bytes]:
    """What prompts that may share whole blocks (under one weights key) are grouped by: their first block."""
    return key, tokens[:PREFIX_BLOCK].tobytes()


def _reusable_length(kept: np.ndarray, tokens: np.ndarray) -> int:
    """How many of `tokens` can start from `kept`'s keys and values: the whole blocks they share,
    leaving at least the last token to compute (its logits are what a prefill is for)."""
    return min(_common_prefix(kept, tokens), len(tokens) - 1) // PREFIX_BLOCK * PREFIX_BLOCK


def _common_prefix(first: np.ndarray, second: np.ndarray) -> int:
    length = min(len(first), len(second))
    differ = np.flatnonzero(first[:length] != second[:length])
    return int(differ[0]) if len(differ) else length


class KvBudget:
    """Bytes for sampling: what generations reserve (keys and values, weights copies), plus prompts
    kept for reuse, which give way to generations."""

    def __init__(self, total_bytes: int, bytes_per_token: int) -> None:
        self.total_bytes, self.bytes_per_token = total_bytes, bytes_per_token
        self.prefixes = PrefixCache()

    def rows_bytes(self, rows: int, positions: int) -> int:
        return rows * positions * self.bytes_per_token

    def make_room(self, needed: int, reserved: int) -> bool:
        """Whether `needed` more bytes fit beside `reserved`, dropping kept prompts as needed."""
        if reserved + needed > self.total_bytes:
            return False
        self.prefixes.shrink_to(self.total_bytes - reserved - needed)
        return True

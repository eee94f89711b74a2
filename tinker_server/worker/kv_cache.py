"""The keys and values of generations: reserved up front, counted against a memory budget, and
kept for the prompts of later requests.

A generation's plain attention layers hold their keys and values in buffers with room for every
token its rows may still generate (`ReservedLayer`): a decode step writes its column in place
instead of copying the whole cache to grow it. Layers of other kinds (sliding windows, recurrent
state) keep Hugging Face's own classes. What generations reserve, and the prompts kept for reuse
(`PrefixCache`), stay within one budget (`KvBudget`): kept prompts give way first, then requests
wait for rows to finish.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from tinker_server.worker.lora import RowRouting, contiguous_segments
from tinker_server.worker.models import final_hidden_states

PREFIX_BLOCK = 16
"""Prompts are reused in whole blocks of this many tokens (as vLLM does): a hit means a shared
prefix, never a chance match of a first token or two."""


class ReservedLayer(DynamicLayer):
    """A plain attention layer's keys and values [rows, heads, length, dim], views of buffers
    with room for `capacity` positions."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> None:
        super().__init__()
        self.device, self.is_initialized = keys.device, True
        length = keys.shape[2]
        self._key_buffer = keys.new_empty((*keys.shape[:2], max(capacity, length), keys.shape[3]))
        self._value_buffer = values.new_empty((*values.shape[:2], max(capacity, length), values.shape[3]))
        self._key_buffer[:, :, :length] = keys
        self._value_buffer[:, :, :length] = values
        self._expose(length)

    @property
    def capacity(self) -> int:
        return self._key_buffer.shape[2]

    @property
    def reserved_bytes(self) -> int:
        return self._key_buffer.nbytes + self._value_buffer.nbytes

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.keys.shape[2]
        end = start + key_states.shape[2]
        if end > self.capacity:  # more than was reserved: grow, doubling (not reached when reserved right)
            self.__init__(self.keys, self.values, max(end, 2 * self.capacity))
        self._key_buffer[:, :, start:end] = key_states
        self._value_buffer[:, :, start:end] = value_states
        self._expose(end)
        return self.keys, self.values

    def _expose(self, length: int) -> None:
        self.keys, self.values = self._key_buffer[:, :, :length], self._value_buffer[:, :, :length]


def is_plain(layer: object) -> bool:
    return type(layer) is DynamicLayer or isinstance(layer, ReservedLayer)


def reserve_rows(cache: DynamicCache, rows: torch.Tensor, capacity: int) -> None:
    """Keeps only `rows` (in that order) of every layer; plain layers get room for `capacity` positions."""
    for index, layer in enumerate(cache.layers):
        if is_plain(layer):
            cache.layers[index] = ReservedLayer(layer.keys[rows], layer.values[rows], capacity)
        else:
            layer.reorder_cache(rows)


def join_rows(cache: DynamicCache, other: DynamicCache, capacity: int) -> None:
    """Appends `other`'s rows to `cache`'s (plain layers only): the shorter is left-padded with
    zeros (masked by the caller), so every row's latest position stays in the last column."""
    for index, (mine, theirs) in enumerate(zip(cache.layers, other.layers, strict=True)):
        length = max(mine.keys.shape[2], theirs.keys.shape[2])
        keys = torch.cat([_pad_left(mine.keys, length), _pad_left(theirs.keys, length)])
        values = torch.cat([_pad_left(mine.values, length), _pad_left(theirs.values, length)])
        cache.layers[index] = ReservedLayer(keys, values, capacity)


def reserved_bytes(cache: DynamicCache) -> int:
    return sum(
        layer.reserved_bytes if isinstance(layer, ReservedLayer) else layer.keys.nbytes + layer.values.nbytes
        for layer in cache.layers
        if layer.is_initialized
    )


def _pad_left(tensor: torch.Tensor, length: int) -> torch.Tensor:
    missing = length - tensor.shape[2]
    if missing == 0:
        return tensor
    return torch.cat([tensor.new_zeros((*tensor.shape[:2], missing, tensor.shape[3])), tensor], dim=2)


@torch.no_grad()
def kv_bytes_per_token(model: PreTrainedModel, routing: RowRouting, device: torch.device) -> int:
    """What one row's cache holds per position, measured on one token (any architecture's layout)."""
    cache = DynamicCache(config=model.config)
    with routing.route(contiguous_segments([None])):
        final_hidden_states(model, input_ids=torch.zeros((1, 1), dtype=torch.long, device=device), cache=cache)
    return reserved_bytes(cache)


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
    recently used ones leave first; `forget` drops the prompts of weights that changed."""

    def __init__(self) -> None:
        self._kept: OrderedDict[int, KeptPrompt] = OrderedDict()
        self.nbytes = 0

    def longest_prefix(self, key: str, tokens: np.ndarray) -> tuple[KeptPrompt | None, int]:
        """The kept prompt sharing the most whole blocks with `tokens` (leaving at least its last
        token to compute), and how many tokens they share."""
        best, best_length = None, 0
        for kept in self._kept.values():
            if kept.key != key:
                continue
            length = reusable_length(kept.tokens, tokens)
            if length > best_length:
                best, best_length = kept, length
        if best is not None:
            self._kept.move_to_end(id(best))
        return best, best_length

    def wants(self, key: str, tokens: np.ndarray) -> bool:
        """Whether keeping this prompt adds anything: a whole block, and no kept prompt begins with it."""
        return len(tokens) > PREFIX_BLOCK and not any(
            kept.key == key and _common_prefix(kept.tokens, tokens) == len(tokens) for kept in self._kept.values()
        )

    def keep(self, prompt: KeptPrompt) -> None:
        """Keeps `prompt` (which `wants` it) in place of the kept prompts it begins with."""
        for kept in list(self._kept.values()):
            if kept.key == prompt.key and _common_prefix(kept.tokens, prompt.tokens) == len(kept.tokens):
                self._drop(kept)
        self._kept[id(prompt)] = prompt
        self.nbytes += prompt.nbytes

    def forget(self, key: str) -> None:
        for kept in [kept for kept in self._kept.values() if kept.key == key]:
            self._drop(kept)

    def shrink_to(self, nbytes: int) -> None:
        """Drops least recently used prompts until at most `nbytes` are kept."""
        while self._kept and self.nbytes > nbytes:
            self._drop(next(iter(self._kept.values())))

    def _drop(self, kept: KeptPrompt) -> None:
        del self._kept[id(kept)]
        self.nbytes -= kept.nbytes


def reusable_length(kept: np.ndarray, tokens: np.ndarray) -> int:
    """How many of `tokens` can start from `kept`'s keys and values: the whole blocks they share,
    leaving at least the last token to compute (its logits are what a prefill is for)."""
    return min(_common_prefix(kept, tokens), len(tokens) - 1) // PREFIX_BLOCK * PREFIX_BLOCK


def _common_prefix(first: np.ndarray, second: np.ndarray) -> int:
    length = min(len(first), len(second))
    differ = np.flatnonzero(first[:length] != second[:length])
    return int(differ[0]) if len(differ) else length


class KvBudget:
    """Bytes for keys and values: what generations reserve, plus prompts kept for reuse, which
    give way to generations."""

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

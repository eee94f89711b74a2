"""Adapters as a cache: a bounded number are resident on the device; the others wait, exactly,
in host memory (off a GPU) or on disk, and come back on their next use.

A training run's adapter waits with everything that continuing it needs: its weights, its
pending gradients and its AdamW state, so a run that left and came back trains on bit for bit
as if it had never left. A sampler snapshot waits as its checkpoint files (an ephemeral one's
are written in the background, or when it leaves if that comes first). Least recently used
first; the limits hold between cycles.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tinker_server import ops
from tinker_server.worker.lora import LoraPair
from tinker_server.worker.snapshot_writes import PendingWrite

Stash = dict[str, torch.Tensor]
"""An adapter's tensors on the CPU, by name: `<path>.A`, `<path>.A.grad`, `<path>.A.exp_avg`, ..."""


@dataclass
class Adapter:
    """A training run's LoRA weights (one pair per adapted weight) and its own AdamW."""

    name: str
    spec: ops.LoraSpec
    pairs: dict[str, LoraPair]
    optimizer: torch.optim.AdamW = field(init=False)

    def __post_init__(self) -> None:
        self.optimizer = torch.optim.AdamW(self.parameters())

    def parameters(self) -> list[torch.Tensor]:
        return [tensor for pair in self.pairs.values() for tensor in (pair.A, pair.B)]


@dataclass
class Entry:
    """One adapter, wherever it is: resident (`adapter` or `pairs`), in host memory (`stash`),
    or on disk (`spill` for a run; its checkpoint `directory` for a snapshot)."""

    name: str
    spec: ops.LoraSpec
    scalings: dict[str, float]
    nbytes: int
    adapter: Adapter | None = None
    pairs: dict[str, LoraPair] | None = None
    stash: Stash | None = None
    spill: Path | None = None
    directory: Path | None = None
    writing: PendingWrite | None = None
    """A snapshot's files, written in the background (or not at all if it goes first)."""
    last_used: float = field(default_factory=time.monotonic)

    @property
    def is_run(self) -> bool:
        return self.directory is None

    @property
    def resident(self) -> bool:
        return self.adapter is not None or self.pairs is not None


@dataclass(frozen=True)
class ResidencyLimits:
    max_resident_runs: int = 256
    """Training adapters resident on the device (between cycles)."""
    max_resident_snapshot_bytes: int = 1 << 30
    """Device bytes of sampler snapshots; least recently used ones leave beyond it."""
    max_host_bytes: int = 4 << 30
    """Host memory for adapters moved off a GPU; beyond it they go to disk. (On a CPU the device
    is host memory: adapters leave straight for disk.)"""
    idle_seconds: float = 600.0
    """An adapter unused this long goes to disk."""


class Residency:
    """Where every adapter of the engine is, and the moves that keep within the limits."""

    def __init__(
        self,
        device: torch.device,
        spill_dir: Path,
        limits: ResidencyLimits,
        attach: Callable[[str, dict[str, LoraPair]], None],
        detach: Callable[[str], None],
        read_snapshot: Callable[[Path], dict[str, LoraPair]],
    ) -> None:
        self.device = device
        self.spill_dir = spill_dir
        self.limits = limits
        self._attach, self._detach, self._read_snapshot = attach, detach, read_snapshot
        self.entries: dict[str, Entry] = {}
        self.offloads = self.reloads = 0

    # -- what the engine asks for ----------------------------------------------------

    def add_run(self, adapter: Adapter) -> None:
        """Makes `adapter` its run's, replacing any earlier one."""
        name, pairs = adapter.name, adapter.pairs
        self.drop(name)
        self.entries[name] = Entry(name, adapter.spec, _scalings(pairs), 4 * weight_bytes(pairs), adapter=adapter)
        self._attach(name, pairs)

    def add_snapshot(
        self, name: str, spec: ops.LoraSpec, pairs: dict[str, LoraPair], directory: Path, writing: PendingWrite | None
    ) -> None:
        self.drop(name)
        entry = Entry(name, spec, _scalings(pairs), weight_bytes(pairs), pairs=pairs, directory=directory)
        entry.writing = writing
        self.entries[name] = entry
        self._attach(name, pairs)

    def run(self, name: str) -> Adapter | None:
        """The run's adapter, made resident; None when there is no such run."""
        entry = self.entries.get(name)
        if entry is None or not entry.is_run:
            return None
        self._make_resident(entry)
        return entry.adapter

    def resident_runs(self) -> dict[str, Adapter]:
        """The training adapters on the device now, by run."""
        return {name: entry.adapter for name, entry in self.entries.items() if entry.adapter is not None}

    def has_snapshot(self, name: str) -> bool:
        entry = self.entries.get(name)
        return entry is not None and not entry.is_run

    def use(self, name: str) -> None:
        """The adapter (a run's or a snapshot's) is about to be used: resident now."""
        self._make_resident(self.entries[name])

    def write_out_snapshots(self, prefix: str) -> None:
        """Writes the files of the snapshots named `prefix...` whose background write is pending."""
        for name, entry in self.entries.items():
            if name.startswith(prefix) and entry.writing is not None:
                entry.writing.finish()

    def drop(self, name: str) -> None:
        entry = self.entries.pop(name, None)
        if entry is None:
            return
        self._detach(name)
        if entry.writing is not None:
            entry.writing.cancel()  # never written if not started; never deleted under a writer
        if entry.spill is not None:
            entry.spill.unlink(missing_ok=True)

    def settle(self, now: float | None = None) -> None:
        """After a cycle: idle adapters, then those beyond the limits, leave the device, least
        recently used first."""
        now = time.monotonic() if now is None else now
        for entry in self._by_age():
            if now - entry.last_used > self.limits.idle_seconds and (entry.resident or entry.stash is not None):
                self._to_disk(entry)
        runs = [entry for entry in self._by_age() if entry.is_run and entry.resident]
        for entry in runs[: max(0, len(runs) - self.limits.max_resident_runs)]:
            self._offload(entry)
        snapshots = [entry for entry in self._by_age() if not entry.is_run and entry.resident]
        self._offload_beyond(snapshots, self.limits.max_resident_snapshot_bytes, self._offload)
        hosted = [entry for entry in self._by_age() if entry.stash is not None]
        self._offload_beyond(hosted, self.limits.max_host_bytes, self._to_disk)

    def stats(self) -> ops.ResidencyStats:
        entries = list(self.entries.values())
        return ops.ResidencyStats(
            resident_runs=sum(entry.is_run and entry.resident for entry in entries),
            resident_snapshots=sum(not entry.is_run and entry.resident for entry in entries),
            offloaded=sum(not entry.resident for entry in entries),
            device_bytes=sum(entry.nbytes for entry in entries if entry.resident),
            host_bytes=sum(entry.nbytes for entry in entries if entry.stash is not None),
            spilled_bytes=sum(entry.spill.stat().st_size for entry in entries if entry.spill is not None),
            offloads=self.offloads,
            reloads=self.reloads,
            offloaded_runs=tuple(entry.name for entry in entries if entry.is_run and not entry.resident),
        )

    # -- moves ---------------------------------------------------------------------

    def _by_age(self) -> list[Entry]:
        return sorted(self.entries.values(), key=lambda entry: entry.last_used)

    @staticmethod
    def _offload_beyond(entries: list[Entry], limit: int, move: Callable[[Entry], None]) -> None:
        excess = sum(entry.nbytes for entry in entries) - limit
        for entry in entries:
            if excess <= 0:
                return
            move(entry)
            excess -= entry.nbytes

    def _offload(self, entry: Entry) -> None:
        """Off the device: into host memory when the device is a GPU, else to disk."""
        if self.device.type == "cpu":
            self._to_disk(entry)
        else:
            entry.stash = self._take(entry)
        self.offloads += 1

    def _take(self, entry: Entry) -> Stash:
        """Copies of the resident entry's tensors on the CPU; the entry leaves the device."""
        stash = _stash(entry.adapter.pairs, entry.adapter.optimizer) if entry.is_run else _stash(entry.pairs, None)
        self._detach(entry.name)
        entry.adapter = entry.pairs = None
        return stash

    def _to_disk(self, entry: Entry) -> None:
        if not entry.is_run:  # a snapshot's checkpoint files hold it (written now if they were not yet)
            if entry.writing is not None and not entry.writing.finish():
                return  # they could not be written: it stays in memory
            if entry.resident:
                self._detach(entry.name)
            entry.pairs = entry.stash = None
            return
        stash = entry.stash if entry.stash is not None else self._take(entry) if entry.resident else None
        if stash is None:
            return
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        entry.spill = self.spill_dir / f"{entry.name}.safetensors"
        save_file({key: value.contiguous() for key, value in stash.items()}, str(entry.spill))
        entry.stash = None

    def _make_resident(self, entry: Entry) -> None:
        entry.last_used = time.monotonic()
        if entry.resident:
            return
        if not entry.is_run and entry.stash is None:
            pairs = self._read_snapshot(entry.directory)
        else:
            stash = entry.stash if entry.stash is not None else load_file(str(entry.spill))
            pairs = {
                path: LoraPair(
                    torch.nn.Parameter(stash[f"{path}.A"].to(self.device)),
                    torch.nn.Parameter(stash[f"{path}.B"].to(self.device)),
                    scaling,
                )
                for path, scaling in entry.scalings.items()
            }
            if entry.is_run:
                entry.adapter = Adapter(entry.name, entry.spec, pairs)
                _restore_training_state(entry.adapter, stash, self.device)
        if not entry.is_run:
            entry.pairs = pairs
        self._attach(entry.name, pairs)
        if entry.spill is not None:
            entry.spill.unlink(missing_ok=True)
        entry.stash = entry.spill = None
        self.reloads += 1


def _matrices(pairs: dict[str, LoraPair]) -> Iterator[tuple[str, torch.Tensor]]:
    for path, pair in pairs.items():
        yield f"{path}.A", pair.A
        yield f"{path}.B", pair.B


def _stash(pairs: dict[str, LoraPair], optimizer: torch.optim.Optimizer | None) -> Stash:
    """The weights and, for a run, their gradients and optimizer state, copied to the CPU."""
    stash: Stash = {}
    for key, param in _matrices(pairs):
        stash[key] = param.detach().to("cpu", copy=True)
        if param.grad is not None:
            stash[f"{key}.grad"] = param.grad.detach().to("cpu", copy=True)
        state = optimizer.state.get(param, {}) if optimizer is not None else {}
        for name, value in state.items():
            stash[f"{key}.state.{name}"] = value.detach().to("cpu", copy=True)
    return stash


def _restore_training_state(adapter: Adapter, stash: Stash, device: torch.device) -> None:
    """Gradients and AdamW state onto a rebuilt adapter (`step` stays on the CPU, as AdamW keeps it)."""
    for key, param in _matrices(adapter.pairs):
        if f"{key}.grad" in stash:
            param.grad = stash[f"{key}.grad"].to(device)
        prefix = f"{key}.state."
        state = {
            name.removeprefix(prefix): value if name.endswith(".step") else value.to(device)
            for name, value in stash.items()
            if name.startswith(prefix)
        }
        if state:
            adapter.optimizer.state[param] = state


def _scalings(pairs: dict[str, LoraPair]) -> dict[str, float]:
    return {path: pair.scaling for path, pair in pairs.items()}


def weight_bytes(pairs: dict[str, LoraPair]) -> int:
    return sum(tensor.numel() * tensor.element_size() for pair in pairs.values() for tensor in (pair.A, pair.B))

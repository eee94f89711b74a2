"""The front end's record of training runs and sampler snapshots (in memory for now)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tinker_server.ops import LoraSpec

TINKER_SCHEME = "tinker://"


def sampler_path(model_id: str, name: str) -> str:
    return f"{TINKER_SCHEME}{model_id}/sampler_weights/{name}"


@dataclass
class TrainingRun:
    model_id: str
    base_model: str
    lora: LoraSpec
    user_metadata: dict[str, str]
    created_at: float = field(default_factory=time.time)


class RunRegistry:
    def __init__(self) -> None:
        self._runs: dict[str, TrainingRun] = {}
        # Paths reserved at submission, so two queued saves cannot claim one name.
        self._sampler_paths: set[str] = set()

    def add_run(self, run: TrainingRun) -> None:
        self._runs[run.model_id] = run

    def remove_run(self, model_id: str) -> None:
        self._runs.pop(model_id, None)

    def run(self, model_id: str) -> TrainingRun | None:
        return self._runs.get(model_id)

    def reserve_sampler_path(self, path: str) -> bool:
        if path in self._sampler_paths:
            return False
        self._sampler_paths.add(path)
        return True

    def release_sampler_path(self, path: str) -> None:
        self._sampler_paths.discard(path)

    def has_sampler_path(self, path: str) -> bool:
        return path in self._sampler_paths

"""The worker leaves cuDNN's attention out on a GPU: it builds an execution plan for every new set
of shapes, and a worker's shapes (one more key column each decode step, rows joining and leaving,
each training batch padded to its own length) seldom repeat. Elsewhere nothing changes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from tinker_server.worker import main
from tinker_server.worker.attention_kernels import avoid_per_shape_plans


@pytest.fixture(autouse=True)
def restored_kernels() -> Iterator[None]:
    enabled = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(True)
    yield
    torch.backends.cuda.enable_cudnn_sdp(enabled)


def test_a_worker_on_a_gpu_runs_attention_without_cudnn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(main, "keep_freed_memory", lambda: True)  # this process's allocator stays as it is
    assert main.prepare_process() == torch.device("cuda")
    assert not torch.backends.cuda.cudnn_sdp_enabled()
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()


def test_elsewhere_the_kernels_stay_as_pytorch_chooses() -> None:
    avoid_per_shape_plans(torch.device("cpu"))
    assert torch.backends.cuda.cudnn_sdp_enabled()

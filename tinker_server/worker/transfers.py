"""Host-to-device copies that do not make the host wait for the device.

A copy from ordinary (pageable) host memory to a GPU waits until the stream has run everything
queued before it: PyTorch synchronizes after it. A decode step makes several small ones (its rows'
sampling numbers, which rows go on, the rows' adapters), and each such wait leaves the GPU idle
while the host goes back to launching kernels. From pinned memory, with `non_blocking`, the copy
takes its place in the stream and the host goes on; PyTorch keeps the pinned buffer until the copy
has run."""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` (on the host) on `device`, copied without waiting for the device."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)

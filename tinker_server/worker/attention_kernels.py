"""Which of PyTorch's attention kernels the worker's model runs on a GPU.

On Hopper and Blackwell GPUs PyTorch tries cuDNN's fused attention first (from 2.10, once its
bundled cuDNN is past 9.15; pytorch/pytorch#162073). cuDNN builds an execution plan for each new
set of shapes (tens to hundreds of milliseconds, more for a backward pass) and keeps it for the
next call at those shapes. The worker's shapes seldom repeat: each decode step attends over one
more column, rows join and leave a generation, each training batch pads to its own length. On an
H200 every decode step at shapes not seen before cost 40-90 ms, 13 ms once seen, for the engine and
for `generate` alike. Without cuDNN, attention runs on FlashAttention or the memory-efficient
kernels, which build nothing per shape. `bench/attention_shapes.py` times both orders side by side.
"""

from __future__ import annotations

import torch


def avoid_per_shape_plans(device: torch.device) -> None:
    """Leaves cuDNN's attention out on a CUDA device (process-wide); elsewhere changes nothing."""
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)

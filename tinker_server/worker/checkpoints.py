"""Checkpoint files: adapters in peft's format, optimizer state beside them, both safetensors.

peft's format (adapter_config.json + adapter_model.safetensors, keys
`base_model.model.<module path>.lora_A.weight`) means a saved adapter loads in peft, vLLM
or anything else that reads peft adapters, with no merge. Nothing here is pickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from tinker_server import ops
from tinker_server.worker.lora import ATTN, MLP, UNEMBED, LoraPair, MultiLoRALinear

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
OPTIMIZER_STATE = "optimizer.safetensors"
_PREFIX = "base_model.model."


class CheckpointError(Exception):
    """A checkpoint that cannot be loaded into this base model."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _key(path: str, matrix: str) -> str:
    return f"{_PREFIX}{path}.lora_{matrix}.weight"


def write_adapter(directory: Path, spec: ops.LoraSpec, pairs: dict[str, LoraPair], base_model: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        target_modules=sorted({path.rsplit(".", 1)[-1] for path in pairs}),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
    )
    config.save_pretrained(str(directory))
    tensors = {}
    for path, pair in pairs.items():
        tensors[_key(path, "A")] = pair.A.detach().cpu().contiguous()
        tensors[_key(path, "B")] = pair.B.detach().cpu().contiguous()
    save_file(tensors, str(directory / ADAPTER_WEIGHTS))


def write_optimizer_state(directory: Path, pairs: dict[str, LoraPair], optimizer: torch.optim.Optimizer) -> None:
    """AdamW's per-weight state (step, exp_avg, exp_avg_sq), keyed like the adapter's weights."""
    tensors = {}
    for path, pair in pairs.items():
        for matrix, param in (("A", pair.A), ("B", pair.B)):
            for name, value in optimizer.state.get(param, {}).items():
                tensors[f"{_key(path, matrix)}.{name}"] = value.detach().cpu().contiguous().reshape(value.shape)
    save_file(tensors, str(directory / OPTIMIZER_STATE))


def read_adapter(
    directory: Path, layers: dict[str, MultiLoRALinear], device: torch.device
) -> tuple[ops.LoraSpec, dict[str, LoraPair]]:
    """Loads a peft adapter, checking every tensor against this base model's layers."""
    config_file, weights_file = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    if not config_file.is_file() or not weights_file.is_file():
        raise CheckpointError(grpc.StatusCode.NOT_FOUND, f"{directory.name}: no {ADAPTER_CONFIG} / {ADAPTER_WEIGHTS}")
    try:
        config = json.loads(config_file.read_text())
        rank, alpha = int(config["r"]), float(config["lora_alpha"])
        tensors = load_file(str(weights_file))
    except (ValueError, KeyError, OSError) as error:
        raise CheckpointError(grpc.StatusCode.INVALID_ARGUMENT, f"unreadable adapter: {error}") from error
    pairs: dict[str, LoraPair] = {}
    expected_keys = set()
    for path, layer in layers.items():
        a_key, b_key = _key(path, "A"), _key(path, "B")
        if a_key not in tensors and b_key not in tensors:
            continue
        expected_keys |= {a_key, b_key}
        a, b = tensors.get(a_key), tensors.get(b_key)
        base = layer.base
        for key, tensor, shape in ((a_key, a, (rank, base.in_features)), (b_key, b, (base.out_features, rank))):
            if tensor is None or tuple(tensor.shape) != shape:
                found = "missing" if tensor is None else f"shape {list(tensor.shape)}"
                raise CheckpointError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{key}: {found}; this base model needs {list(shape)} (rank {rank})",
                )
        pairs[path] = LoraPair(  # adapters are float32 whatever the base model's dtype
            A=torch.nn.Parameter(a.to(device=device, dtype=torch.float32)),
            B=torch.nn.Parameter(b.to(device=device, dtype=torch.float32)),
            scaling=alpha / rank,
        )
    if unknown := sorted(set(tensors) - expected_keys):
        raise CheckpointError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{unknown[0]} (and {len(unknown) - 1} more): no such layer in this base model",
        )
    if not pairs:
        raise CheckpointError(grpc.StatusCode.INVALID_ARGUMENT, f"{ADAPTER_WEIGHTS} holds no LoRA weights")
    kinds = {layers[path].kind for path in pairs}
    spec = ops.LoraSpec(rank, 0, MLP in kinds, ATTN in kinds, UNEMBED in kinds, alpha)
    return spec, pairs


def read_optimizer_state(directory: Path, pairs: dict[str, LoraPair], optimizer: torch.optim.Optimizer) -> None:
    state_file = directory / OPTIMIZER_STATE
    if not state_file.is_file():
        raise CheckpointError(
            grpc.StatusCode.FAILED_PRECONDITION, f"{directory.name}: no optimizer state (a sampler checkpoint?)"
        )
    tensors = load_file(str(state_file))
    for path, pair in pairs.items():
        for matrix, param in (("A", pair.A), ("B", pair.B)):
            prefix = f"{_key(path, matrix)}."
            state = {key.removeprefix(prefix): value for key, value in tensors.items() if key.startswith(prefix)}
            if state:
                optimizer.state[param] = {
                    name: value.to(param.device) if name != "step" else value for name, value in state.items()
                }


def directory_size(directory: Path) -> int:
    return sum(file.stat().st_size for file in directory.rglob("*") if file.is_file())

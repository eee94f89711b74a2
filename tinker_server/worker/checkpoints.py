"""Checkpoint files: adapters in peft's format, optimizer state beside them, both safetensors.

peft's format (adapter_config.json + adapter_model.safetensors, keys
`base_model.model.<module path>.lora_A.weight`) means a saved adapter loads in peft, vLLM
or anything else that reads peft adapters, with no merge. Fused expert weights are saved as
peft's `target_parameters` saves them: A [experts * r, in], B [out, r * experts], under the
experts module's path with one `.base_layer` per wrapper peft nests around it. Nothing here
is pickled.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import grpc
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from tinker_server import ops
from tinker_server.worker.lora import ExpertSite, LoraPair, LoraSite
from tinker_server.worker.targets import ATTN, MLP, UNEMBED

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
OPTIMIZER_STATE = "optimizer.safetensors"
GRADIENTS = "gradients.safetensors"
_PREFIX = "base_model.model."


class CheckpointError(Exception):
    """A checkpoint that cannot be loaded into this base model."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _key(path: str, matrix: str) -> str:
    return f"{_PREFIX}{path}.lora_{matrix}.weight"


def _peft_key(sites: dict[str, LoraSite], path: str, matrix: str) -> str:
    """Where peft keeps a site's A or B: for an expert weight, under its experts module, inside
    one `.base_layer` per parameter peft wraps after it (it wraps them in declaration order)."""
    site = sites[path]
    if not isinstance(site, ExpertSite):
        return _key(path, matrix)
    module = path.rsplit(".", 1)[0]
    siblings = [other for other in sites if isinstance(sites[other], ExpertSite) and other.rsplit(".", 1)[0] == module]
    depth = len(siblings) - 1 - siblings.index(path)
    return _key(module + ".base_layer" * depth, matrix)


def _to_peft(site: LoraSite, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A [E, r, in] -> [E * r, in] and B [E, out, r] -> [out, r * E] (rank-major, as peft reads it)."""
    if not site.experts:
        return a, b
    return a.reshape(-1, a.shape[-1]), b.permute(1, 2, 0).reshape(b.shape[1], -1)


def _peft_shapes(site: LoraSite, rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
    experts = max(site.experts, 1)
    return (experts * rank, site.in_features), (site.out_features, rank * experts)


def _from_peft(site: LoraSite, a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not site.experts:
        return a, b
    return a.reshape(site.experts, rank, -1), b.reshape(b.shape[0], rank, site.experts).permute(2, 0, 1)


def _peft_targets(sites: dict[str, LoraSite], adapted: set[str]) -> dict[str, object]:
    """LoraConfig's target fields naming exactly the adapted sites: module leaf names where
    those name no other adaptable module (else an exact regex), expert parameters by suffix."""
    layers = [path for path in sites if not isinstance(sites[path], ExpertSite)]
    chosen = [path for path in layers if path in adapted]
    leaves = {path.rsplit(".", 1)[-1] for path in chosen}
    if any(path.rsplit(".", 1)[-1] in leaves for path in layers if path not in adapted):
        target_modules: object = "^(" + "|".join(re.escape(path) for path in sorted(chosen)) + ")$"
    else:
        target_modules = sorted(leaves) or None
    experts = sorted({".".join(path.rsplit(".", 2)[-2:]) for path in adapted if isinstance(sites[path], ExpertSite)})
    conv1d = any(getattr(sites[path], "fan_in_fan_out", False) for path in chosen)
    return {"target_modules": target_modules, "target_parameters": experts or None, "fan_in_fan_out": conv1d}


def write_adapter(
    directory: Path, spec: ops.LoraSpec, pairs: dict[str, LoraPair], base_model: str, sites: dict[str, LoraSite]
) -> None:
    """Into an existing directory (`tinker_server.files.write_whole` makes it whole)."""
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
        **_peft_targets(sites, set(pairs)),
    )
    config.save_pretrained(str(directory))
    tensors = {}
    for path, pair in pairs.items():
        a, b = _to_peft(sites[path], pair.A.detach().cpu(), pair.B.detach().cpu())
        tensors[_peft_key(sites, path, "A")] = a.contiguous()
        tensors[_peft_key(sites, path, "B")] = b.contiguous()
    save_file(tensors, str(directory / ADAPTER_WEIGHTS))


def write_optimizer_state(directory: Path, pairs: dict[str, LoraPair], optimizer: torch.optim.Optimizer) -> None:
    """AdamW's per-weight state (step, exp_avg, exp_avg_sq), keyed like the adapter's weights."""
    tensors = {}
    for path, pair in pairs.items():
        for matrix, param in (("A", pair.A), ("B", pair.B)):
            for name, value in optimizer.state.get(param, {}).items():
                tensors[f"{_key(path, matrix)}.{name}"] = value.detach().cpu().contiguous().reshape(value.shape)
    save_file(tensors, str(directory / OPTIMIZER_STATE))


def write_gradients(directory: Path, pairs: dict[str, LoraPair]) -> None:
    """The gradients accumulated since the last step, keyed like the adapter's weights."""
    tensors = {
        _key(path, matrix): param.grad.detach().cpu().contiguous()
        for path, pair in pairs.items()
        for matrix, param in (("A", pair.A), ("B", pair.B))
        if param.grad is not None
    }
    save_file(tensors, str(directory / GRADIENTS))


def read_gradients(directory: Path, pairs: dict[str, LoraPair]) -> None:
    tensors = load_file(str(directory / GRADIENTS))
    for path, pair in pairs.items():
        for matrix, param in (("A", pair.A), ("B", pair.B)):
            if (grad := tensors.get(_key(path, matrix))) is not None:
                param.grad = grad.to(param.device)


def read_adapter(
    directory: Path, sites: dict[str, LoraSite], device: torch.device
) -> tuple[ops.LoraSpec, dict[str, LoraPair]]:
    """Loads a peft adapter, checking every tensor against this base model's adaptable weights."""
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
    for path, site in sites.items():
        a_key, b_key = _peft_key(sites, path, "A"), _peft_key(sites, path, "B")
        if a_key not in tensors and b_key not in tensors:
            continue
        expected_keys |= {a_key, b_key}
        a, b = tensors.get(a_key), tensors.get(b_key)
        a_shape, b_shape = _peft_shapes(site, rank)
        for key, tensor, shape in ((a_key, a, a_shape), (b_key, b, b_shape)):
            if tensor is None or tuple(tensor.shape) != shape:
                found = "missing" if tensor is None else f"shape {list(tensor.shape)}"
                raise CheckpointError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{key}: {found}; this base model needs {list(shape)} (rank {rank})",
                )
        a, b = _from_peft(site, a, b, rank)
        pairs[path] = LoraPair(  # adapters are float32 whatever the base model's dtype
            A=torch.nn.Parameter(a.to(device=device, dtype=torch.float32).contiguous()),
            B=torch.nn.Parameter(b.to(device=device, dtype=torch.float32).contiguous()),
            scaling=alpha / rank,
        )
    if unknown := sorted(set(tensors) - expected_keys):
        raise CheckpointError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{unknown[0]} (and {len(unknown) - 1} more): no such layer in this base model",
        )
    if not pairs:
        raise CheckpointError(grpc.StatusCode.INVALID_ARGUMENT, f"{ADAPTER_WEIGHTS} holds no LoRA weights")
    kinds = {sites[path].kind for path in pairs}
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
            for name, value in state.items():
                if name != "step" and value.shape != param.shape:
                    raise CheckpointError(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"{OPTIMIZER_STATE}: {prefix}{name} has shape {list(value.shape)}; "
                        f"its weight has {list(param.shape)}",
                    )
            if state:
                optimizer.state[param] = {
                    name: value.to(param.device) if name != "step" else value for name, value in state.items()
                }


def directory_size(directory: Path) -> int:
    return sum(file.stat().st_size for file in directory.rglob("*") if file.is_file())

"""Which weights of a base model LoRA adapts, by architecture, and the wrapping that does it.

`train_attn`, `train_mlp` and `train_unembed` cover the attention projections, the MLP
projections and the output embedding. Found generically, by module path and type:
- nn.Linear layers, fused ones included (Phi-3's qkv_proj, gate_up_proj);
- GPT-2's Conv1D layers (weight [in, out]);
- mixture-of-experts layers in transformers' fused experts format (3-D gate_up_proj /
  down_proj parameters), with one LoRA per expert, as peft's `target_parameters` does.
Routers (a MoE block's `gate` / `router`) are never adapted. A weight this code cannot adapt
(e.g. experts in another format) is reported, so a flag that would silently skip it is refused.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from torch import nn
from transformers.pytorch_utils import Conv1D

from tinker_server.worker.lora import ExpertSite, LoraSite, MultiLoRAExperts, MultiLoRALinear, RowRouting

ATTN, MLP, UNEMBED = "attn", "mlp", "unembed"
KINDS = (ATTN, MLP, UNEMBED)
_ROUTERS = {"gate", "router"}
_EXPERT_PROTOCOL = ("is_transposed", "has_gate", "has_bias", "num_experts")


@dataclass
class LoraTargets:
    """Every adaptable weight of a model by path, and what could not be adapted, by flag."""

    sites: dict[str, LoraSite] = field(default_factory=dict)
    unsupported: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def paths(self, kind: str) -> list[str]:
        return sorted(path for path, site in self.sites.items() if site.kind == kind)


def kind_of(path: str, model: nn.Module) -> str | None:
    """The flag that covers the module at `path`: attention, MLP, the output embedding, or none."""
    if model.get_output_embeddings() is model.get_submodule(path):
        return UNEMBED
    for segment in reversed(path.lower().split(".")):  # the nearest enclosing block decides
        if "attn" in segment or "attention" in segment:
            return ATTN
        if any(word in segment for word in ("mlp", "feed_forward", "ffn", "moe", "experts")):
            return MLP
    return None


def _is_router(path: str) -> bool:
    return path.rsplit(".", 1)[-1] in _ROUTERS


def _expert_parameters(module: nn.Module) -> list[str]:
    """The fused expert weights of a module in transformers' experts format, in declaration order
    (the order peft nests its wrappers in, which names the saved tensors)."""
    if not all(hasattr(module, attribute) for attribute in _EXPERT_PROTOCOL):
        return []
    names = ("gate_up_proj", "down_proj") if module.has_gate else ("up_proj", "down_proj")
    return [name for name, param in module.named_parameters(recurse=False) if name in names and param.ndim == 3]


def _expert_site(path: str, experts: nn.Module, name: str, kind: str) -> ExpertSite:
    count, first, second = getattr(experts, name).shape
    in_features, out_features = (first, second) if experts.is_transposed else (second, first)
    return ExpertSite(f"{path}.{name}", kind, in_features, out_features, count)


def wrap_lora_targets(model: nn.Module, routing: RowRouting) -> LoraTargets:
    """Replaces every adaptable layer with its multi-LoRA counterpart; returns them by path."""
    targets = LoraTargets()
    replacements: list[tuple[str, nn.Module]] = []
    for path, module in model.named_modules():
        kind = kind_of(path, model) if path else None
        if kind is None or _is_router(path):
            continue
        if isinstance(module, nn.Linear | Conv1D):
            layer = MultiLoRALinear(module, routing, kind, path)
            targets.sites[path] = layer
            replacements.append((path, layer))
        elif names := _expert_parameters(module):
            if getattr(module, "has_post_expert_norm", False):
                targets.unsupported[kind].append(f"{path} (experts with a norm after each expert)")
                continue
            sites = {name: _expert_site(path, module, name, kind) for name in names}
            targets.sites.update({site.path: site for site in sites.values()})
            replacements.append((path, MultiLoRAExperts(module, routing, sites)))
        elif any(param.ndim == 3 for param in module.parameters(recurse=False)):
            targets.unsupported[kind].append(
                f"{path} ({type(module).__name__}: fused 3-D weights in an unknown format)"
            )
    for path, replacement in replacements:
        parent_path, _, attribute = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, attribute, replacement)
    return targets

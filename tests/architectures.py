"""Tiny seeded configurations of the architectures people fine-tune, saved as local Hugging Face
model directories by the tests themselves (no downloads)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, PretrainedConfig

from tinker_server.worker.models import byte_tokenizer

_SHARED = {
    "vocab_size": 259,  # the byte tokenizer's: 256 bytes + bos, eos, pad
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "bos_token_id": 256,
    "eos_token_id": 257,
    "pad_token_id": 258,
}

CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "llama": lambda: transformers.LlamaConfig(**_SHARED),
    "qwen3": lambda: transformers.Qwen3Config(**_SHARED, head_dim=16),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **_SHARED, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32
    ),
    "gpt_oss": lambda: transformers.GptOssConfig(
        **_SHARED,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
    ),
    "gemma3": lambda: transformers.Gemma3TextConfig(**_SHARED, head_dim=16, sliding_window=8),
    "mistral": lambda: transformers.MistralConfig(**_SHARED),
    "phi3": lambda: transformers.Phi3Config(**_SHARED),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=259, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=256, eos_token_id=257
    ),
}

# The weights each flag adapts, by leaf name (a fused expert weight as "experts.<parameter>").
_DENSE = {
    "attn": {"q_proj", "k_proj", "v_proj", "o_proj"},
    "mlp": {"gate_proj", "up_proj", "down_proj"},
    "unembed": {"lm_head"},
}
_MOE = {**_DENSE, "mlp": {"experts.gate_up_proj", "experts.down_proj"}}
EXPECTED_TARGETS: dict[str, dict[str, set[str]]] = {
    "llama": _DENSE,
    "qwen3": _DENSE,
    "qwen3_moe": _MOE,
    "gpt_oss": _MOE,
    "gemma3": _DENSE,
    "mistral": _DENSE,
    "phi3": {"attn": {"qkv_proj", "o_proj"}, "mlp": {"gate_up_proj", "down_proj"}, "unembed": {"lm_head"}},
    "gpt2": {"attn": {"attn.c_attn", "attn.c_proj"}, "mlp": {"mlp.c_fc", "mlp.c_proj"}, "unembed": {"lm_head"}},
}


def leaf(path: str) -> str:
    """ "model.layers.0.mlp.experts.down_proj" -> "experts.down_proj"; GPT-2 keeps its block name
    (its attention and MLP both have a c_proj)."""
    parts = path.split(".")
    if len(parts) > 1 and (parts[-2] == "experts" or (parts[0] == "transformer" and parts[-2] in ("attn", "mlp"))):
        return ".".join(parts[-2:])
    return parts[-1]


def save_model(name: str, directory: Path) -> Path:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[name]())
    model.save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    return directory

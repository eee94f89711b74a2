"""Base models: the embedded default (seeded, built locally) and local Hugging Face directories."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

EMBEDDED_MODEL_NAME = "embedded/tiny-llama"
_EMBEDDED_SEED = 20241125
_BOS, _EOS, _PAD = "<|bos|>", "<|eos|>", "<|pad|>"


@dataclass
class LoadedModel:
    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    max_context_length: int


def embedded_model_config() -> LlamaConfig:
    """A 4-layer, 256-wide Llama over a byte vocabulary: trains in seconds on a CPU."""
    return LlamaConfig(
        vocab_size=259,  # 256 bytes + bos, eos, pad
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
        tie_word_embeddings=False,
    )


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Token id i is byte i for i < 256; then bos, eos, pad. Needs no download."""
    byte_to_char = _bytes_to_unicode()
    vocab = {byte_to_char[byte]: byte for byte in range(256)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([_BOS, _EOS, _PAD])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{_BOS} $A", pair=f"{_BOS} $A $B", special_tokens=[(_BOS, 256)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=_BOS, eos_token=_EOS, pad_token=_PAD)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map, used by ByteLevel pre-tokenizers."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


def build_embedded_model() -> PreTrainedModel:
    """The same weights on every machine: a fixed seed on the CPU generator."""
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(_EMBEDDED_SEED)
        model = LlamaForCausalLM(embedded_model_config())
    finally:
        torch.random.set_rng_state(generator_state)
    return model.float().eval()


def load_base_model(source: str | None) -> LoadedModel:
    """`source` is None for the embedded model, else a local Hugging Face model directory."""
    if source is None:
        model = build_embedded_model()
        return LoadedModel(EMBEDDED_MODEL_NAME, model, byte_tokenizer(), model.config.max_position_embeddings)
    path = Path(source)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--base-model {source}: no config.json; expected a Hugging Face model directory")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    max_context = getattr(model.config, "max_position_embeddings", None) or 2048
    return LoadedModel(str(source), model.eval(), tokenizer, int(max_context))


def tokenizer_files(tokenizer: PreTrainedTokenizerBase) -> dict[str, bytes]:
    """The files of `save_pretrained`, so a client rebuilds the exact tokenizer."""
    with tempfile.TemporaryDirectory() as directory:
        tokenizer.save_pretrained(directory)
        return {path.name: path.read_bytes() for path in Path(directory).iterdir() if path.is_file()}

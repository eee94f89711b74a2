"""Base models: the embedded default (seeded, built locally) and local Hugging Face directories."""

from __future__ import annotations

import functools
import inspect
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Cache,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

EMBEDDED_MODEL_NAME = "embedded/tiny-llama"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
"""The base weights' dtypes `--dtype` offers, besides `auto`; adapters and Adam state are float32 always."""
_EMBEDDED_SEED = 20241125
_BOS, _EOS, _PAD = "<|bos|>", "<|eos|>", "<|pad|>"


@dataclass
class LoadedModel:
    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    max_context_length: int
    eos_token_ids: tuple[int, ...]
    """Every token that ends a sequence (sampling stops at each unless asked not to)."""


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


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on a CUDA device that has it, else float32 (CPUs lack fast bfloat16 matmuls)."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_base_model(source: str | None, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """`source` is None for the embedded model, else a local Hugging Face model directory; its
    weights are loaded in `dtype` (the embedded model is built in float32, then cast, so every
    dtype rounds the same weights)."""
    if source is None:
        model = build_embedded_model().to(dtype)
        name, tokenizer, max_context = EMBEDDED_MODEL_NAME, byte_tokenizer(), model.config.max_position_embeddings
    else:
        path = Path(source)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"--base-model {source}: no config.json; expected a Hugging Face model directory")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        name, max_context = str(source), getattr(model.config, "max_position_embeddings", None) or 2048
    return LoadedModel(name, model, tokenizer, int(max_context), eos_token_ids(model, tokenizer))


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """The generation config's end-of-sequence ids (generation_config.json may list several, e.g.
    a chat model's end-of-turn token beside its end-of-text one) and the tokenizer's."""
    configured = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = {configured} if isinstance(configured, int) else set(configured or ())
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return tuple(sorted(ids))


def final_hidden_states(model: PreTrainedModel, cache: Cache | None = None, **inputs: object) -> torch.Tensor:
    """The decoder's last hidden states [B, T, H], final norm included: all of the model but its
    output embedding (`base_model` is the decoder of every Hugging Face causal LM), filling `cache`."""
    decoder = model.base_model
    if cache is not None:
        inputs[cache_keyword(type(decoder))] = cache
    return decoder(**inputs).last_hidden_state


@functools.cache
def cache_keyword(decoder: type[torch.nn.Module]) -> str:
    """What the decoder calls its key/value cache: `cache` in newer transformers 5 releases,
    `past_key_values` before (5.17 takes `cache` into its **kwargs and leaves it empty, silently)."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def output_logits(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """float32 logits [..., V] of final hidden states [..., H]: the output embedding (with the
    adapters of the routing in force), upcast before anything sums over the vocabulary, then what
    the config declares and the model's own forward applies: Cohere's logit_scale, Granite's
    logits_scaling, Gemma's final soft-capping."""
    config = model.config
    logits = model.get_output_embeddings()(hidden).float()
    scale = (getattr(config, "logit_scale", None) or 1.0) / (getattr(config, "logits_scaling", None) or 1.0)
    if scale != 1.0:
        logits = logits * scale
    cap = getattr(config, "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap


def check_output_logits(model: PreTrainedModel) -> None:
    """The worker computes logits as output_logits(final_hidden_states(tokens)), so that they never
    exist for a whole batch at once; a model whose own forward does something else (say, a logit
    scale) is refused at start rather than served with wrong logprobs."""
    tokens = torch.arange(8, device=model.device)[None] % model.config.get_text_config().vocab_size
    with torch.no_grad():
        expected = model(input_ids=tokens, use_cache=False).logits.float()
        actual = output_logits(model, final_hidden_states(model, input_ids=tokens, use_cache=False))
    # The model's forward may soft-cap in its own dtype: allow a few of its rounding steps.
    tolerance = 1e-4 if model.dtype == torch.float32 else 4 * torch.finfo(model.dtype).eps
    if not torch.allclose(actual, expected, rtol=tolerance, atol=tolerance):
        error = float((actual - expected).abs().max())
        raise ValueError(
            f"{type(model).__name__}: its logits are not its output embedding of its decoder's last hidden "
            f"states (max difference {error:.3g}); this server cannot compute its logprobs"
        )


def tokenizer_files(tokenizer: PreTrainedTokenizerBase) -> dict[str, bytes]:
    """The files of `save_pretrained`, so a client rebuilds the exact tokenizer."""
    with tempfile.TemporaryDirectory() as directory:
        tokenizer.save_pretrained(directory)
        return {path.name: path.read_bytes() for path in Path(directory).iterdir() if path.is_file()}

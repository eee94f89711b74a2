"""A seeded Llama of a chosen size, written as a local Hugging Face directory, for the benchmarks'
`--base-model` on a GPU: real shapes (a few hundred million parameters and up), no download. Its
weights are random, so what it generates means nothing; what a step costs is what it is.

    python -m bench.make_model /tmp/model-0.9b --hidden 2048 --layers 16 --intermediate 5632
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tinker_server.worker.models import byte_tokenizer


def write_model(path: str, hidden: int, layers: int, intermediate: int, vocab: int, dtype: torch.dtype) -> int:
    """Writes the model and the embedded byte tokenizer (ids 256-258: bos, eos, pad; the rest of
    the vocabulary is never produced by it); returns the model's parameter count."""
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=max(hidden // 128, 2),  # head_dim 128, as Llama's
        num_key_value_heads=max(hidden // 256, 1),  # grouped-query attention, two queries per key
        max_position_embeddings=4096,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # initialising a large model is slow on a CPU
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return sum(parameter.numel() for parameter in model.parameters())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="the directory to write")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args(argv)
    parameters = write_model(
        args.path, args.hidden, args.layers, args.intermediate, args.vocab, getattr(torch, args.dtype)
    )
    print(json.dumps({"model": args.path, "parameters": parameters, "dtype": args.dtype}))


if __name__ == "__main__":
    main()

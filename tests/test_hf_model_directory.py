"""`--base-model PATH` serves a local Hugging Face directory, saved here by the test itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from server_process import running_server
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from tinker_client import ServiceClient, types
from tinker_server.worker.models import byte_tokenizer

from .architectures import save_model
from .helpers import ragged_batch, reference_logprobs, sampler_dir


@pytest.fixture(scope="module")
def qwen_directory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2 (biased q/k/v projections, tied embeddings): not the embedded Llama."""
    directory = tmp_path_factory.mktemp("tiny-qwen2")
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=259,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
    )
    Qwen2ForCausalLM(config).save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    return directory


def test_a_saved_model_directory_is_served_and_trained(qwen_directory: Path, tmp_path: Path):
    data = ragged_batch(seed=6, lengths=[10, 4])
    with running_server(tmp_path, ["--base-model", str(qwen_directory)]) as address:
        service = ServiceClient(base_url=address)
        capabilities = service.get_server_capabilities()
        assert [model.model_name for model in capabilities.supported_models] == [str(qwen_directory)]
        assert capabilities.supported_models[0].max_context_length == 256
        training = service.create_lora_training_client(str(qwen_directory), rank=4, seed=0).result()
        assert training.get_info().model_data.arch == "Qwen2ForCausalLM"
        assert training.get_tokenizer().encode("hi", add_special_tokens=False) == [ord("h"), ord("i")]

        first = training.forward(data, "cross_entropy").result()
        losses = []
        for _ in range(10):
            losses.append(training.forward_backward(data, "cross_entropy").result().metrics["loss:sum"])
            training.optim_step(types.AdamParams(learning_rate=1e-2))
        service.close()

    reference = AutoModelForCausalLM.from_pretrained(qwen_directory)
    with torch.no_grad():
        for output, datum in zip(first.loss_fn_outputs, data, strict=True):
            np.testing.assert_allclose(
                output["logprobs"].to_numpy(), reference_logprobs(reference, datum).numpy(), atol=1e-4
            )
    assert losses[-1] < 0.7 * losses[0]


def test_a_directory_without_a_model_fails_at_start_with_the_reason(tmp_path: Path):
    with (
        pytest.raises(RuntimeError, match="no config.json"),
        running_server(tmp_path / "data", ["--base-model", str(tmp_path)], startup_timeout=60),
    ):
        pass


def test_a_mixture_of_experts_model_trains_its_experts_with_train_mlp_alone(tmp_path: Path):
    directory = save_model("qwen3_moe", tmp_path / "tiny-qwen3-moe")
    data = ragged_batch(seed=7, lengths=[9, 5])
    with running_server(tmp_path / "data", ["--base-model", str(directory)]) as address:
        service = ServiceClient(base_url=address)
        training = service.create_lora_training_client(
            str(directory), rank=4, seed=0, train_mlp=True, train_attn=False, train_unembed=False
        ).result()
        trained = training.get_info().trained_modules
        assert trained == [
            f"model.layers.{layer}.mlp.experts.{name}" for layer in (0, 1) for name in ("down_proj", "gate_up_proj")
        ]
        losses = []
        for _ in range(6):
            losses.append(training.forward_backward(data, "cross_entropy").result().metrics["loss:sum"])
            training.optim_step(types.AdamParams(learning_rate=1e-2))
        after = training.forward(data, "cross_entropy").result()
        sampler_path = training.save_weights_for_sampler("experts").result().path
        service.close()
    assert losses[-1] < 0.9 * losses[0]
    adapter = sampler_dir(tmp_path / "data", sampler_path)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(directory), str(adapter))
    with torch.no_grad():
        for output, datum in zip(after.loss_fn_outputs, data, strict=True):
            np.testing.assert_allclose(
                output["logprobs"].to_numpy(), reference_logprobs(reference, datum).numpy(), atol=1e-4
            )

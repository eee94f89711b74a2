"""LoRA options are honoured: seed, rank, and which layers train (attn / mlp / unembed)."""

from __future__ import annotations

import pytest
import torch

from tinker_client import BadRequestError, types

from .conftest import BASE_MODEL
from .helpers import adapter_tensors, ragged_batch, sampler_dir

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def saved(service, server, name: str, **options) -> dict[str, torch.Tensor]:
    training = service.create_lora_training_client(BASE_MODEL, **options).result()
    return adapter_tensors(sampler_dir(server.data_dir, training.save_weights_for_sampler(name).result().path))


def test_same_seed_gives_the_same_adapter_and_another_seed_does_not(service, server):
    first = saved(service, server, "a", rank=4, seed=123)
    again = saved(service, server, "b", rank=4, seed=123)
    other = saved(service, server, "c", rank=4, seed=124)
    for key in first:
        assert torch.equal(first[key], again[key]), key
    assert any(not torch.equal(first[key], other[key]) for key in first if "lora_A" in key)


@pytest.mark.parametrize(
    ("flags", "expected_layers"),
    [
        ({"train_attn": True, "train_mlp": False, "train_unembed": False}, set(ATTN)),
        ({"train_attn": False, "train_mlp": True, "train_unembed": False}, set(MLP)),
        ({"train_attn": False, "train_mlp": False, "train_unembed": True}, {"lm_head"}),
        ({"train_attn": True, "train_mlp": True, "train_unembed": True}, {*ATTN, *MLP, "lm_head"}),
    ],
)
def test_train_flags_choose_the_adapted_layers(service, server, flags, expected_layers):
    tensors = saved(service, server, f"flags-{len(expected_layers)}", rank=4, seed=1, **flags)
    layers = {key.split(".lora_")[0].rsplit(".", 1)[-1] for key in tensors}
    assert layers == expected_layers
    assert all(tensor.shape[0] == 4 for key, tensor in tensors.items() if "lora_A" in key)


def test_frozen_layers_do_not_move_in_training(service, server):
    training = service.create_lora_training_client(
        BASE_MODEL, rank=4, seed=2, train_attn=True, train_mlp=False, train_unembed=False
    ).result()
    training.forward_backward(ragged_batch(seed=5, lengths=[8]), "cross_entropy")
    training.optim_step(types.AdamParams(learning_rate=1e-2))
    tensors = adapter_tensors(sampler_dir(server.data_dir, training.save_weights_for_sampler("x").result().path))
    assert all(any(name in key for name in ATTN) for key in tensors)
    assert any(tensor.abs().sum() > 0 for key, tensor in tensors.items() if "lora_B" in key)


def test_get_info_reports_the_options_actually_used(service):
    training = service.create_lora_training_client(BASE_MODEL, rank=6, seed=None, train_unembed=False).result()
    info = training.get_info()
    assert info.model_id == training.model_id
    assert info.model_data.model_name == BASE_MODEL
    assert info.model_data.arch == "LlamaForCausalLM"
    assert info.is_lora and info.lora_rank == 6
    assert info.lora_config.seed is not None  # the drawn seed is reported, so it can be reused
    assert (info.lora_config.train_mlp, info.lora_config.train_attn, info.lora_config.train_unembed) == (
        True,
        True,
        False,
    )


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"rank": 0}, "lora_config.rank"),
        ({"rank": 10_000}, "lora_config.rank"),
        ({"train_attn": False, "train_mlp": False, "train_unembed": False}, "lora_config"),
    ],
)
def test_bad_lora_options_are_rejected_by_name(service, options, field):
    with pytest.raises(BadRequestError, match=field.replace(".", r"\.")):
        service.create_lora_training_client(BASE_MODEL, **options).result()

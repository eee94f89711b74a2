"""A flag that cannot be honoured in full is refused at creation, naming the model type and the flag."""

from __future__ import annotations

import grpc
import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from tinker_rpc.v1 import service_pb2, training_pb2
from tinker_server import ops
from tinker_server.api.requests import Limits, RequestError, RequestParser
from tinker_server.runs import Runs
from tinker_server.served import ServedModels
from tinker_server.store import Store
from tinker_server.worker.lora import RowRouting
from tinker_server.worker.targets import wrap_lora_targets


class OddExperts(nn.Module):
    """Fused expert weights in a format this server does not know (no transformers experts protocol)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(4, 8, 8))


def test_experts_in_an_unknown_format_are_reported_not_skipped_silently():
    config = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    model = LlamaForCausalLM(config)
    model.model.layers[0].mlp.add_module("experts", OddExperts())
    targets = wrap_lora_targets(model, RowRouting())
    assert targets.unsupported["mlp"] == [
        "model.layers.0.mlp.experts (OddExperts: fused 3-D weights in an unknown format)"
    ]
    assert targets.paths("mlp") == [f"model.layers.0.mlp.{name}" for name in ("down_proj", "gate_proj", "up_proj")]


def parser_for(info: ops.ModelInfo, tmp_path) -> RequestParser:
    served = ServedModels()
    served.set({info.name: info})
    return RequestParser(served, Runs(Store(tmp_path / "store.db"), tmp_path), Limits())


def create(**flags: bool) -> service_pb2.SessionRequest:
    lora = training_pb2.LoraConfig(rank=4, **{"train_mlp": False, "train_attn": False, "train_unembed": False, **flags})
    return service_pb2.SessionRequest(create_model=training_pb2.CreateModelRequest(base_model="odd", lora_config=lora))


def test_a_flag_whose_weights_cannot_all_be_adapted_is_refused_naming_it(tmp_path):
    info = ops.ModelInfo(
        "odd",
        "OddForCausalLM",
        32,
        64,
        None,
        model_type="odd_moe",
        lora_targets={"attn": ("model.layers.0.self_attn.q_proj",), "mlp": (), "unembed": ("lm_head",)},
        lora_unsupported={"mlp": ("model.layers.0.mlp.experts (OddExperts: fused 3-D weights in an unknown format)",)},
    )
    parser = parser_for(info, tmp_path)
    with pytest.raises(RequestError, match=r"create_model\.lora_config\.train_mlp: odd_moe has weights") as refused:
        parser.parse(create(train_mlp=True, train_attn=True))
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert parser.parse(create(train_attn=True, train_unembed=True)).run is not None  # the others are honoured
    empty = parser_for(
        ops.ModelInfo("odd", "X", 32, 64, None, model_type="no_mlp", lora_targets={"attn": ("a",)}), tmp_path
    )
    with pytest.raises(RequestError, match=r"train_mlp: no_mlp has no mlp weights to adapt"):
        empty.parse(create(train_mlp=True))

"""ServiceClient: the entry point. Connects to a server and creates training and sampling clients."""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from tinker_client import types
from tinker_client._connection import Connection, submit_acked
from tinker_client._tokenizer import tokenizer_from_files
from tinker_client.rest_client import RestClient
from tinker_client.sampling_client import SamplingClient
from tinker_client.training_client import TrainingClient
from tinker_rpc.v1 import runs_pb2, service_pb2, training_pb2

DEFAULT_BASE_URL = "localhost:50051"

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase  # imported when a tokenizer is asked for


class ServiceClient:
    """One connection (one multiplexed stream) to a server.

    >>> service = ServiceClient(base_url="localhost:50051")
    >>> training = service.create_lora_training_client("embedded/tiny-llama", rank=16)
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        tls_root_certificates: bytes | None = None,
        reconnect_timeout: float = 60.0,
    ) -> None:
        """`base_url`: host:port (plaintext) or grpcs://host:port (TLS; pass
        `tls_root_certificates` for a private CA). After a dropped connection the client
        reconnects for up to `reconnect_timeout` seconds, and no request is lost or run twice."""
        base_url = base_url or os.environ.get("TINKER_BASE_URL") or DEFAULT_BASE_URL
        api_key = api_key or os.environ.get("TINKER_API_KEY")
        self._connection = Connection(base_url, api_key, tls_root_certificates, reconnect_timeout)
        self._tokenizers: dict[str, PreTrainedTokenizerBase] = {}

    # -- server ----------------------------------------------------------------------

    @staticmethod
    def _capabilities(response: service_pb2.GetServerCapabilitiesResponse) -> types.GetServerCapabilitiesResponse:
        return types.GetServerCapabilitiesResponse(
            supported_models=[
                types.SupportedModel(
                    model_name=model.model_name,
                    max_context_length=model.max_context_length,
                    trainable=model.trainable,
                    sampleable=model.sampleable,
                    vocab_size=model.vocab_size,
                )
                for model in response.supported_models
            ],
            max_lora_rank=response.max_lora_rank,
            max_message_bytes=response.max_message_bytes,
            max_adapters=response.max_adapters,
            max_inflight_requests=response.max_inflight_requests,
            max_batch_tokens=response.max_batch_tokens,
            max_num_samples=response.max_num_samples,
        )

    def get_server_capabilities(self) -> types.GetServerCapabilitiesResponse:
        request = service_pb2.GetServerCapabilitiesRequest()
        return self._capabilities(self._connection.unary_sync(self._connection.stub.GetServerCapabilities, request))

    async def get_server_capabilities_async(self) -> types.GetServerCapabilitiesResponse:
        request = service_pb2.GetServerCapabilitiesRequest()
        return self._capabilities(await self._connection.unary(self._connection.stub.GetServerCapabilities, request))

    # -- training --------------------------------------------------------------------

    def create_lora_training_client(
        self,
        base_model: str,
        rank: int = 32,
        seed: int | None = None,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = True,
        user_metadata: Mapping[str, str] | None = None,
    ) -> TrainingClient:
        """Creates a LoRA training run; same `seed`, same initial adapter."""
        coroutine = self.create_lora_training_client_async(
            base_model, rank, seed, train_mlp, train_attn, train_unembed, user_metadata
        )
        return self._connection.run(coroutine)

    async def create_lora_training_client_async(
        self,
        base_model: str,
        rank: int = 32,
        seed: int | None = None,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = True,
        user_metadata: Mapping[str, str] | None = None,
    ) -> TrainingClient:
        lora = training_pb2.LoraConfig(
            rank=rank, train_mlp=train_mlp, train_attn=train_attn, train_unembed=train_unembed
        )
        if seed is not None:
            lora.seed = seed
        request = service_pb2.SessionRequest(
            create_model=training_pb2.CreateModelRequest(
                base_model=base_model, lora_config=lora, user_metadata=dict(user_metadata or {})
            )
        )
        return await self._create_training_client(request)

    async def _create_training_client(self, request: service_pb2.SessionRequest) -> TrainingClient:
        future = await submit_acked(self._connection, request, lambda result: result.create_model.model_id)
        return await self._training_client(await future)

    async def _training_client(self, model_id: str) -> TrainingClient:
        capabilities = await self.get_server_capabilities_async()
        base_model = _served_model_name(capabilities)
        return TrainingClient(
            self._connection,
            model_id,
            base_model,
            functools.partial(self._tokenizer, base_model),
            max_request_bytes=int(capabilities.max_message_bytes * 0.9),
        )

    def create_training_client_from_state(
        self, path: str, user_metadata: Mapping[str, str] | None = None
    ) -> TrainingClient:
        """A new run starting from a checkpoint's weights (and LoRA config); fresh optimizer state."""
        return self._connection.run(self.create_training_client_from_state_async(path, user_metadata))

    async def create_training_client_from_state_async(
        self, path: str, user_metadata: Mapping[str, str] | None = None
    ) -> TrainingClient:
        return await self._from_state(path, user_metadata, with_optimizer=False)

    def create_training_client_from_state_with_optimizer(
        self, path: str, user_metadata: Mapping[str, str] | None = None
    ) -> TrainingClient:
        """A new run resuming a `save_state` checkpoint exactly: weights and optimizer state."""
        return self._connection.run(self.create_training_client_from_state_with_optimizer_async(path, user_metadata))

    async def create_training_client_from_state_with_optimizer_async(
        self, path: str, user_metadata: Mapping[str, str] | None = None
    ) -> TrainingClient:
        return await self._from_state(path, user_metadata, with_optimizer=True)

    async def _from_state(
        self, path: str, user_metadata: Mapping[str, str] | None, with_optimizer: bool
    ) -> TrainingClient:
        create = training_pb2.CreateModelFromStateRequest(
            path=path, with_optimizer=with_optimizer, user_metadata=dict(user_metadata or {})
        )
        return await self._create_training_client(service_pb2.SessionRequest(create_model_from_state=create))

    def create_training_client_from_peft_adapter(
        self, adapter_dir: str | Path, user_metadata: Mapping[str, str] | None = None
    ) -> TrainingClient:
        """A new run starting from a local peft adapter for the served base model (its
        adapter_config.json and adapter_model.safetensors are uploaded and checked)."""
        return self._connection.run(self.create_training_client_from_peft_adapter_async(adapter_dir, user_metadata))

    async def create_training_client_from_peft_adapter_async(
        self, adapter_dir: str | Path, user_metadata: Mapping[str, str] | None = None
    ) -> TrainingClient:
        directory = Path(adapter_dir)
        files = {name: (directory / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")}
        request = runs_pb2.ImportPeftAdapterRequest(files=files, user_metadata=dict(user_metadata or {}))
        response = await self._connection.unary(self._connection.runs.ImportPeftAdapter, request)
        return await self._training_client(response.model_id)

    def create_rest_client(self) -> RestClient:
        """Lists, inspects, deletes and downloads training runs and checkpoints."""
        return RestClient(self._connection)

    # -- sampling --------------------------------------------------------------------

    def create_sampling_client(self, model_path: str | None = None, base_model: str | None = None) -> SamplingClient:
        """Samples from saved sampler weights (`model_path`) or from a bare `base_model`."""
        _check_one_source(model_path, base_model)
        if base_model is None:
            base_model = _served_model_name(self.get_server_capabilities())
        return self._sampling_client(model_path, base_model)

    async def create_sampling_client_async(
        self, model_path: str | None = None, base_model: str | None = None
    ) -> SamplingClient:
        _check_one_source(model_path, base_model)
        if base_model is None:
            base_model = _served_model_name(await self.get_server_capabilities_async())
        return self._sampling_client(model_path, base_model)

    def _sampling_client(self, model_path: str | None, base_model: str) -> SamplingClient:
        return SamplingClient(
            self._connection,
            base_model=base_model,
            model_path=model_path,
            tokenizer_loader=functools.partial(self._tokenizer, base_model),
        )

    # -- tokenizers ------------------------------------------------------------------

    def _tokenizer(self, base_model: str) -> PreTrainedTokenizerBase:
        if base_model not in self._tokenizers:
            response = self._connection.unary_sync(
                self._connection.stub.GetTokenizer, service_pb2.GetTokenizerRequest(base_model=base_model)
            )
            self._tokenizers[base_model] = tokenizer_from_files(dict(response.files))
        return self._tokenizers[base_model]

    # -- lifetime --------------------------------------------------------------------

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _check_one_source(model_path: str | None, base_model: str | None) -> None:
    if (model_path is None) == (base_model is None):
        raise ValueError("create_sampling_client: give exactly one of model_path or base_model")


def _served_model_name(capabilities: types.GetServerCapabilitiesResponse) -> str:
    """The base model behind a sampler path: this server serves one."""
    return capabilities.supported_models[0].model_name or ""

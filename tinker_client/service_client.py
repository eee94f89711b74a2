"""ServiceClient: the entry point. Connects to a server and creates training and sampling clients."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Coroutine, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from tinker_client import _convert, types
from tinker_client._connection import Connection, ConnectionSettings
from tinker_client._submit import submit_acked
from tinker_client.custom_loss import LossHandle, PerDatumLossFn, trace_loss
from tinker_client.errors import APIError
from tinker_client.futures import APIFuture, AwaitableConcurrentFuture, completed
from tinker_client.rest_client import RestClient
from tinker_client.sampling_client import (
    BackcompatSamplingClientFuture,
    SamplingClient,
    check_no_retry_config,
    new_sampling_client,
    start_sampling_client,
)
from tinker_client.training_client import (
    BackcompatTrainingClientFuture,
    TrainingClient,
    check_access_token,
    fetch_training_client,
)
from tinker_rpc.v1 import runs_pb2, service_pb2, training_pb2

SessionStatus = Literal["success", "errored", "interrupted"]
log = logging.getLogger(__name__)

UPLOAD_PIECE_BYTES = 1 << 20
"""Pieces of an uploaded adapter: far below any message-size limit."""


class ServiceClient:
    """One connection (one multiplexed stream) to a server, and one session on it.

    >>> service = ServiceClient(base_url="localhost:50051")
    >>> training = service.create_lora_training_client("embedded/tiny-llama", rank=16).result()
    """

    def __init__(
        self,
        user_metadata: dict[str, str] | None = None,
        project_id: str | None = None,
        *,
        display_name: str | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        default_headers_overrides: Mapping[str, str] | None = None,
        tls_root_certificates: bytes | None = None,
        reconnect_timeout: float = 60.0,
        **kwargs: Any,
    ) -> None:
        """`base_url`: host:port (plaintext) or grpcs://host:port (TLS; pass
        `tls_root_certificates` for a private CA); default $TINKER_BASE_URL, else
        localhost:50051. `api_key`: default $TINKER_API_KEY. `user_metadata`, `project_id`
        and `display_name` label the session and the runs it creates. After a dropped
        connection the client reconnects for up to `reconnect_timeout` seconds, and no
        request is lost or run twice. `default_headers_overrides` go out as gRPC metadata."""
        if kwargs:
            raise TypeError(
                f"ServiceClient: unsupported option(s) {sorted(kwargs)}; the hosted SDK's HTTP settings have no "
                "meaning over gRPC (this client takes base_url, api_key, tls_root_certificates, reconnect_timeout)"
            )
        settings = ConnectionSettings.resolve(
            base_url, api_key, tls_root_certificates, reconnect_timeout, default_headers_overrides
        )
        self._connection = Connection(settings)
        self._session_request = service_pb2.CreateSessionRequest(
            user_metadata=user_metadata or {}, project_id=project_id or "", display_name=display_name or ""
        )
        self._session: concurrent.futures.Future[str] | None = None

    # -- session ---------------------------------------------------------------------

    def _session_id(self) -> concurrent.futures.Future[str]:
        """The session, opened on first use."""
        if self._session is None:
            connection = self._connection
            session = connection.unary_future(connection.stub.CreateSession, self._session_request)
            self._session = _chain(session, lambda response: response.session_id)
        return self._session

    async def _session_id_async(self) -> str:
        return await asyncio.wrap_future(self._session_id())

    def _start(self, coroutine: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        return asyncio.run_coroutine_threadsafe(coroutine, self._connection.loop)

    # -- server ----------------------------------------------------------------------

    def get_server_capabilities(self) -> types.GetServerCapabilitiesResponse:
        return _convert.capabilities(self._connection.capabilities(fresh=True).result())

    async def get_server_capabilities_async(self) -> types.GetServerCapabilitiesResponse:
        return _convert.capabilities(await asyncio.wrap_future(self._connection.capabilities(fresh=True)))

    def get_console_url(self) -> str:
        """The web console's list of your training runs; raises UnsupportedFeatureError when the server
        runs without a console (no --console-port)."""
        return types.training.console_page(self._connection.capabilities().result().console_url, "runs")

    def get_telemetry(self) -> None:
        """This SDK sends no telemetry."""
        return None

    # -- training --------------------------------------------------------------------

    async def _create_run(self, operation: dict[str, Any]) -> TrainingClient:
        session_id = await self._session_id_async()
        for message in operation.values():
            message.session_id = session_id
        future = await submit_acked(
            self._connection, service_pb2.SessionRequest(**operation), lambda result: result.create_model.model_id
        )
        return await fetch_training_client(self._connection, await future, session_id)

    def _training_client_future(self, operation: dict[str, Any]) -> BackcompatTrainingClientFuture:
        return BackcompatTrainingClientFuture(self._start(self._create_run(operation)))

    def create_lora_training_client(
        self,
        base_model: str,
        rank: int = 32,
        seed: int | None = None,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = True,
        user_metadata: dict[str, str] | None = None,
        optimizer: types.OptimizerConfig | None = None,
    ) -> BackcompatTrainingClientFuture:
        """Creates a LoRA training run; returns a future of its TrainingClient at once.
        The same `seed` gives the same initial adapter."""
        lora = training_pb2.LoraConfig(
            rank=rank, seed=seed, train_mlp=train_mlp, train_attn=train_attn, train_unembed=train_unembed
        )
        create = training_pb2.CreateModelRequest(
            base_model=base_model,
            lora_config=lora,
            user_metadata=user_metadata or {},
            optimizer=_convert.optimizer_config(optimizer),
        )
        return self._training_client_future({"create_model": create})

    async def create_lora_training_client_async(
        self,
        base_model: str,
        rank: int = 32,
        seed: int | None = None,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = True,
        user_metadata: dict[str, str] | None = None,
        optimizer: types.OptimizerConfig | None = None,
    ) -> TrainingClient:
        return await self.create_lora_training_client(
            base_model, rank, seed, train_mlp, train_attn, train_unembed, user_metadata, optimizer
        )

    def _from_state(
        self,
        path: str,
        base_model: str | None,
        user_metadata: dict[str, str] | None,
        weights_access_token: str | None,
        with_optimizer: bool,
        optimizer: types.OptimizerConfig | None = None,
    ) -> BackcompatTrainingClientFuture:
        check_access_token(weights_access_token)
        create = training_pb2.CreateModelFromStateRequest(
            path=path,
            with_optimizer=with_optimizer,
            user_metadata=user_metadata or {},
            base_model=base_model or "",
            optimizer=_convert.optimizer_config(optimizer) if optimizer is not None else None,
        )
        return self._training_client_future({"create_model_from_state": create})

    def create_training_client_from_state(
        self,
        path: str,
        base_model: str | None = None,
        user_metadata: dict[str, str] | None = None,
        weights_access_token: str | None = None,
        optimizer: types.OptimizerConfig | None = None,
    ) -> BackcompatTrainingClientFuture:
        """A new run starting from a checkpoint's weights (and LoRA config); fresh optimizer state.
        `base_model`, when given, must be the checkpoint's."""
        return self._from_state(path, base_model, user_metadata, weights_access_token, False, optimizer)

    async def create_training_client_from_state_async(
        self,
        path: str,
        base_model: str | None = None,
        user_metadata: dict[str, str] | None = None,
        weights_access_token: str | None = None,
        optimizer: types.OptimizerConfig | None = None,
    ) -> TrainingClient:
        return await self.create_training_client_from_state(
            path, base_model, user_metadata, weights_access_token, optimizer
        )

    def create_training_client_from_state_with_optimizer(
        self,
        path: str,
        base_model: str | None = None,
        user_metadata: dict[str, str] | None = None,
        weights_access_token: str | None = None,
    ) -> BackcompatTrainingClientFuture:
        """A new run resuming a `save_state` checkpoint exactly: weights and optimizer state."""
        return self._from_state(path, base_model, user_metadata, weights_access_token, True)

    async def create_training_client_from_state_with_optimizer_async(
        self,
        path: str,
        base_model: str | None = None,
        user_metadata: dict[str, str] | None = None,
        weights_access_token: str | None = None,
    ) -> TrainingClient:
        return await self.create_training_client_from_state_with_optimizer(
            path, base_model, user_metadata, weights_access_token
        )

    def create_training_client_from_peft_adapter(
        self, adapter_dir: str | Path, user_metadata: dict[str, str] | None = None
    ) -> BackcompatTrainingClientFuture:
        """A new run starting from a local peft adapter for the served base model (its
        adapter_config.json and adapter_model.safetensors are uploaded and checked)."""
        directory = Path(adapter_dir)
        files = [directory / name for name in ("adapter_config.json", "adapter_model.safetensors")]
        missing = [str(file) for file in files if not file.is_file()]
        if missing:
            raise FileNotFoundError(f"adapter_dir: no {', '.join(missing)}")

        async def create() -> TrainingClient:
            session_id = await self._session_id_async()
            pieces = _adapter_pieces(files, user_metadata or {})
            response = await self._connection.unary(self._connection.runs.UploadPeftAdapter, pieces)
            return await fetch_training_client(self._connection, response.model_id, session_id)

        return BackcompatTrainingClientFuture(self._start(create()))

    async def create_training_client_from_peft_adapter_async(
        self, adapter_dir: str | Path, user_metadata: dict[str, str] | None = None
    ) -> TrainingClient:
        return await self.create_training_client_from_peft_adapter(adapter_dir, user_metadata)

    def copy_weights(
        self, path: str, *, ttl_seconds: int | None = None, weights_access_token: str | None = None
    ) -> APIFuture[str]:
        """Copies a checkpoint (yours, or a published one) into a new run of yours, in this
        session's project; the future gives the copy's tinker:// path."""
        return self.create_rest_client().copy_weights(
            path,
            self._session_request.project_id or None,
            ttl_seconds=ttl_seconds,
            weights_access_token=weights_access_token,
        )

    # -- sampling and custom losses --------------------------------------------------

    def create_sampling_client(
        self,
        model_path: str | None = None,
        base_model: str | None = None,
        retry_config: Any | None = None,
        record_stability_info: bool = False,
    ) -> BackcompatSamplingClientFuture:
        """Samples from saved sampler weights (`model_path`) or a bare `base_model`; returns a
        future of the SamplingClient. The server checks the weights exist when it is made."""
        check_no_retry_config(retry_config)

        async def create() -> SamplingClient:
            return await new_sampling_client(
                self._connection,
                await self._session_id_async(),
                model_path=model_path,
                base_model=base_model,
                record_stability_info=record_stability_info,
            )

        return start_sampling_client(self._connection, create())

    async def create_sampling_client_async(
        self,
        model_path: str | None = None,
        base_model: str | None = None,
        retry_config: Any | None = None,
        record_stability_info: bool = False,
    ) -> SamplingClient:
        return await self.create_sampling_client(model_path, base_model, retry_config, record_stability_info)

    def create_custom_loss(
        self, fn: PerDatumLossFn, input_ranks: Mapping[str, types.CustomLossInputRank]
    ) -> APIFuture[LossHandle]:
        """A per-datum loss `fn(logprobs, *inputs) -> (loss, metrics)` for forward_backward_custom,
        traced now (torch.fx) and run in this client."""
        return completed(trace_loss(fn, input_ranks, self._session_id().result()))

    def create_rest_client(self) -> RestClient:
        """Lists, inspects, deletes and downloads training runs and checkpoints."""
        return RestClient(self._connection)

    # -- lifetime --------------------------------------------------------------------

    def close(self, status: SessionStatus = "success", detail: str | None = None) -> AwaitableConcurrentFuture[None]:
        """Records how the session ended and closes the connection. A successful end (and a `with`
        block left without an exception) first waits for the answers to every request sent; after
        "errored" or "interrupted", requests still in flight fail at once (the server still runs
        them: their runs keep what they did)."""
        if status not in ("success", "errored", "interrupted"):
            raise ValueError(f"close: status {status!r}; expected 'success', 'errored' or 'interrupted'")
        connection = self._connection

        async def close() -> None:
            if status == "success":
                await connection.settle()
            if self._session is not None and self._session.done() and self._session.exception() is None:
                request = service_pb2.CloseSessionRequest(
                    session_id=self._session.result(), status=status, detail=detail or ""
                )
                try:
                    await connection.unary(connection.stub.CloseSession, request)
                except APIError as error:  # closing anyway: the session's end is a label, not state
                    log.info("could not record the end of session %s: %s", request.session_id, error)
            await connection.aclose()

        if connection.closed or connection.loop.is_closed():  # closing twice (a `with` block's end) is a no-op
            return completed(None)
        future = asyncio.run_coroutine_threadsafe(close(), connection.loop)
        future.result()
        return AwaitableConcurrentFuture(future)

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        self.close("success" if exc_type is None else "errored")


def _chain(future: concurrent.futures.Future[Any], convert: Any) -> concurrent.futures.Future[Any]:
    return AwaitableConcurrentFuture(future, convert=convert).future()


def _adapter_pieces(files: list[Path], user_metadata: dict[str, str]) -> Iterator[runs_pb2.UploadPeftAdapterRequest]:
    """The files in pieces of at most UPLOAD_PIECE_BYTES, read as they are sent (any size, little memory)."""
    yield runs_pb2.UploadPeftAdapterRequest(file=files[0].name, user_metadata=user_metadata)
    for file in files:
        with file.open("rb") as handle:
            while piece := handle.read(UPLOAD_PIECE_BYTES):
                yield runs_pb2.UploadPeftAdapterRequest(file=file.name, data=piece)

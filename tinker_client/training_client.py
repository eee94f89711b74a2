"""TrainingClient: forward, forward_backward and optim_step on one LoRA training run."""

from __future__ import annotations

import concurrent.futures
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, TypeVar

from tinker_client import _convert, types
from tinker_client._connection import Connection, submit, submit_acked, submit_all, submit_all_acked
from tinker_client.futures import APIFuture
from tinker_client.sampling_client import SamplingClient
from tinker_rpc.v1 import service_pb2, training_pb2

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

T = TypeVar("T")


CustomLossFn = Callable[[list[types.Datum], list["torch.Tensor"]], tuple["torch.Tensor", dict[str, float]]]


def _targets_only(data: list[types.Datum]) -> list[types.Datum]:
    """The datums as a plain forward needs them: a custom loss's extra inputs stay here."""
    return [
        types.Datum(
            model_input=datum.model_input, loss_fn_inputs={"target_tokens": datum.loss_fn_inputs["target_tokens"]}
        )
        for datum in data
    ]


def _linearize(
    data: list[types.Datum], loss_fn: CustomLossFn, forward: types.ForwardBackwardOutput
) -> tuple[list[types.Datum], tuple[float, dict[str, float]]]:
    """Evaluates the user's loss and turns its gradient into cross-entropy weights."""
    import torch

    logprobs = [output["logprobs"].to_torch().clone().requires_grad_(True) for output in forward.loss_fn_outputs]
    loss, metrics = loss_fn(data, logprobs)
    grads = torch.autograd.grad(loss, logprobs, allow_unused=True)
    # cross_entropy's loss is -sum(weights * logprobs): weights = -dL/dlogprobs gives dL.
    linearized = [
        types.Datum(
            model_input=datum.model_input,
            loss_fn_inputs={
                "target_tokens": datum.loss_fn_inputs["target_tokens"],
                "weights": types.TensorData.from_torch(-(torch.zeros_like(lp) if grad is None else grad).float()),
            },
        )
        for datum, lp, grad in zip(data, logprobs, grads, strict=True)
    ]
    return linearized, (float(loss.detach()), dict(metrics))


def _custom_output(
    backward: types.ForwardBackwardOutput, loss_and_metrics: tuple[float, dict[str, float]]
) -> types.ForwardBackwardOutput:
    loss, metrics = loss_and_metrics
    outputs = [{"logprobs": output["logprobs"]} for output in backward.loss_fn_outputs]
    return types.ForwardBackwardOutput("custom", outputs, {**metrics, "loss:sum": loss})


def _done(value: T) -> APIFuture[T]:
    future: concurrent.futures.Future[T] = concurrent.futures.Future()
    future.set_result(value)
    return APIFuture(future, lambda result: result)


def _save_state_response(result: service_pb2.Result) -> types.SaveWeightsResponse:
    return types.SaveWeightsResponse(path=result.save_state.path)


def _optim_step_response(result: service_pb2.Result) -> types.OptimStepResponse:
    return types.OptimStepResponse(metrics=dict(result.optim_step.metrics))


def _save_for_sampler_response(result: service_pb2.Result) -> types.SaveWeightsForSamplerResponse:
    return types.SaveWeightsForSamplerResponse(path=result.save_weights_for_sampler.path)


class TrainingClient:
    """Trains one LoRA adapter. Requests run in the order they are made.

    >>> future = training_client.forward_backward(data, "cross_entropy")
    >>> training_client.optim_step(types.AdamParams(learning_rate=1e-4)).result()
    """

    def __init__(
        self,
        connection: Connection,
        model_id: str,
        base_model: str,
        tokenizer_loader: Callable[[], PreTrainedTokenizerBase],
        max_request_bytes: int,
    ) -> None:
        self._connection = connection
        self._max_request_bytes = max_request_bytes
        self.model_id = model_id
        self._base_model = base_model
        self._tokenizer_loader = tokenizer_loader

    def _request(self, **operation: object) -> service_pb2.SessionRequest:
        return service_pb2.SessionRequest(model_id=self.model_id, **operation)

    # -- forward / backward ----------------------------------------------------------

    def _forward_requests(
        self, kind: str, data: list[types.Datum], loss_fn: str, loss_fn_config: Mapping[str, float] | None
    ) -> list[service_pb2.SessionRequest]:
        """One request per chunk that fits in a message; the server runs them back to back."""
        return [
            self._request(**{kind: _convert.forward_backward_input(chunk, loss_fn, loss_fn_config)})
            for chunk in _convert.chunk_data(data, self._max_request_bytes)
        ]

    def forward(
        self, data: list[types.Datum], loss_fn: types.LossFnType, loss_fn_config: Mapping[str, float] | None = None
    ) -> APIFuture[types.ForwardBackwardOutput]:
        """Loss and per-token logprobs under the current weights; no gradients."""
        requests = self._forward_requests("forward", data, loss_fn, loss_fn_config)
        return submit_all(self._connection, requests, _convert.forward_backward_outputs)

    async def forward_async(
        self, data: list[types.Datum], loss_fn: types.LossFnType, loss_fn_config: Mapping[str, float] | None = None
    ) -> APIFuture[types.ForwardBackwardOutput]:
        requests = self._forward_requests("forward", data, loss_fn, loss_fn_config)
        return await submit_all_acked(self._connection, requests, _convert.forward_backward_outputs)

    def forward_backward(
        self, data: list[types.Datum], loss_fn: types.LossFnType, loss_fn_config: Mapping[str, float] | None = None
    ) -> APIFuture[types.ForwardBackwardOutput]:
        """Loss, per-token logprobs, and gradients accumulated until the next optim_step.

        A batch larger than one message goes out as several requests, back to back; their
        gradients accumulate and their outputs come back merged, in order.
        """
        requests = self._forward_requests("forward_backward", data, loss_fn, loss_fn_config)
        return submit_all(self._connection, requests, _convert.forward_backward_outputs)

    async def forward_backward_async(
        self, data: list[types.Datum], loss_fn: types.LossFnType, loss_fn_config: Mapping[str, float] | None = None
    ) -> APIFuture[types.ForwardBackwardOutput]:
        requests = self._forward_requests("forward_backward", data, loss_fn, loss_fn_config)
        return await submit_all_acked(self._connection, requests, _convert.forward_backward_outputs)

    def forward_backward_custom(
        self, data: list[types.Datum], loss_fn: CustomLossFn
    ) -> APIFuture[types.ForwardBackwardOutput]:
        """Gradients of your own torch loss of the per-token logprobs.

        `loss_fn(data, logprobs_list) -> (loss, metrics)`. Runs a `forward`, evaluates the
        loss here, then a `forward_backward` with cross-entropy weights equal to
        -d loss / d logprobs, which carries the same gradient into the adapter. It returns
        once both are done, so later calls are ordered after it.
        """
        forward = self.forward(_targets_only(data), "cross_entropy").result()
        linearized, output = _linearize(data, loss_fn, forward)
        backward = self.forward_backward(linearized, "cross_entropy").result()
        return _done(_custom_output(backward, output))

    async def forward_backward_custom_async(
        self, data: list[types.Datum], loss_fn: CustomLossFn
    ) -> APIFuture[types.ForwardBackwardOutput]:
        forward = await (await self.forward_async(_targets_only(data), "cross_entropy"))
        linearized, output = _linearize(data, loss_fn, forward)
        backward = await (await self.forward_backward_async(linearized, "cross_entropy"))
        return _done(_custom_output(backward, output))

    # -- optimizer -------------------------------------------------------------------

    def _optim_request(
        self, optim_params: types.AdamParams | None, adam_params: types.AdamParams | None
    ) -> service_pb2.SessionRequest:
        if (optim_params is None) == (adam_params is None):
            raise TypeError("optim_step: pass the AdamParams once, as optim_params or adam_params=")
        params = _convert.adam_params(optim_params or adam_params)
        return self._request(optim_step=training_pb2.OptimStepRequest(adam_params=params))

    def optim_step(
        self, optim_params: types.AdamParams | None = None, *, adam_params: types.AdamParams | None = None
    ) -> APIFuture[types.OptimStepResponse]:
        """One AdamW step on the gradients accumulated since the last step; zeroes them.

        Metrics: "grad_norm" (the adapter's global norm before clipping), "learning_rate".
        """
        return submit(self._connection, self._optim_request(optim_params, adam_params), _optim_step_response)

    async def optim_step_async(
        self, optim_params: types.AdamParams | None = None, *, adam_params: types.AdamParams | None = None
    ) -> APIFuture[types.OptimStepResponse]:
        request = self._optim_request(optim_params, adam_params)
        return await submit_acked(self._connection, request, _optim_step_response)

    # -- sampling --------------------------------------------------------------------

    def _save_request(self, name: str, ttl_seconds: int | None) -> service_pb2.SessionRequest:
        save = training_pb2.SaveWeightsForSamplerRequest(name=name, ttl_seconds=ttl_seconds)
        return self._request(save_weights_for_sampler=save)

    def save_weights_for_sampler(
        self, name: str, ttl_seconds: int | None = None
    ) -> APIFuture[types.SaveWeightsForSamplerResponse]:
        """Snapshots the current adapter; the result's `path` is a tinker:// sampler path.

        Later training does not change the snapshot. With `ttl_seconds` the server deletes it then.
        """
        return submit(self._connection, self._save_request(name, ttl_seconds), _save_for_sampler_response)

    async def save_weights_for_sampler_async(
        self, name: str, ttl_seconds: int | None = None
    ) -> APIFuture[types.SaveWeightsForSamplerResponse]:
        request = self._save_request(name, ttl_seconds)
        return await submit_acked(self._connection, request, _save_for_sampler_response)

    def create_sampling_client(self, model_path: str) -> SamplingClient:
        return SamplingClient(
            self._connection,
            base_model=self._base_model,
            model_path=model_path,
            tokenizer_loader=self._tokenizer_loader,
        )

    def save_weights_and_get_sampling_client(self, name: str | None = None) -> SamplingClient:
        """Snapshots the current adapter (under `name`, or a fresh one) and samples from it."""
        path = self.save_weights_for_sampler(name or f"sampler-{uuid.uuid4().hex[:12]}").result().path
        return self.create_sampling_client(path)

    async def save_weights_and_get_sampling_client_async(self, name: str | None = None) -> SamplingClient:
        future = await self.save_weights_for_sampler_async(name or f"sampler-{uuid.uuid4().hex[:12]}")
        return self.create_sampling_client((await future).path)

    # -- checkpoints -----------------------------------------------------------------

    def _save_state_request(self, name: str, ttl_seconds: int | None, overwrite: bool) -> service_pb2.SessionRequest:
        return self._request(
            save_state=training_pb2.SaveStateRequest(name=name, ttl_seconds=ttl_seconds, overwrite=overwrite)
        )

    def save_state(
        self, name: str, ttl_seconds: int | None = None, overwrite: bool = False
    ) -> APIFuture[types.SaveWeightsResponse]:
        """Saves weights and optimizer state as tinker://<run>/weights/<name> (peft format +
        optimizer.safetensors). An existing name needs `overwrite=True`."""
        request = self._save_state_request(name, ttl_seconds, overwrite)
        return submit(self._connection, request, _save_state_response)

    async def save_state_async(
        self, name: str, ttl_seconds: int | None = None, overwrite: bool = False
    ) -> APIFuture[types.SaveWeightsResponse]:
        request = self._save_state_request(name, ttl_seconds, overwrite)
        return await submit_acked(self._connection, request, _save_state_response)

    def _load_request(self, path: str, with_optimizer: bool) -> service_pb2.SessionRequest:
        return self._request(load_state=training_pb2.LoadStateRequest(path=path, with_optimizer=with_optimizer))

    def _loaded(self, path: str) -> Callable[[service_pb2.Result], types.LoadWeightsResponse]:
        return lambda _: types.LoadWeightsResponse(path=path)

    def load_state(self, path: str) -> APIFuture[types.LoadWeightsResponse]:
        """Replaces this run's weights with a checkpoint's; the optimizer state starts afresh."""
        return submit(self._connection, self._load_request(path, False), self._loaded(path))

    async def load_state_async(self, path: str) -> APIFuture[types.LoadWeightsResponse]:
        return await submit_acked(self._connection, self._load_request(path, False), self._loaded(path))

    def load_state_with_optimizer(self, path: str) -> APIFuture[types.LoadWeightsResponse]:
        """Replaces this run's weights and optimizer state with a `weights` checkpoint's."""
        return submit(self._connection, self._load_request(path, True), self._loaded(path))

    async def load_state_with_optimizer_async(self, path: str) -> APIFuture[types.LoadWeightsResponse]:
        return await submit_acked(self._connection, self._load_request(path, True), self._loaded(path))

    # -- description -----------------------------------------------------------------

    @staticmethod
    def _info(response: service_pb2.GetInfoResponse) -> types.GetInfoResponse:
        return types.GetInfoResponse(
            model_id=response.model_id,
            model_data=types.ModelData(
                arch=response.arch, model_name=response.model_name, tokenizer_id=response.tokenizer_id
            ),
            is_lora=response.is_lora,
            lora_rank=response.lora_rank,
            model_name=response.model_name,
            lora_config=_convert.lora_config(response.lora_config),
            lora_alpha=response.lora_alpha,
        )

    def get_info(self) -> types.GetInfoResponse:
        return self._info(
            self._connection.unary_sync(
                self._connection.stub.GetInfo, service_pb2.GetInfoRequest(model_id=self.model_id)
            )
        )

    async def get_info_async(self) -> types.GetInfoResponse:
        request = service_pb2.GetInfoRequest(model_id=self.model_id)
        return self._info(await self._connection.unary(self._connection.stub.GetInfo, request))

    def get_tokenizer(self) -> PreTrainedTokenizerBase:
        return self._tokenizer_loader()

    def __repr__(self) -> str:
        return f"TrainingClient(model_id={self.model_id!r}, base_model={self._base_model!r})"

"""RunsService: the records of training runs and checkpoints (the SDK's RestClient)."""

from __future__ import annotations

import asyncio
import json
import tarfile
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from tinker_rpc.v1 import runs_pb2, runs_pb2_grpc
from tinker_server import ops
from tinker_server.api.dispatch import Dispatcher, status_code
from tinker_server.api.requests import LORA_ALPHA, ParsedRequest, RequestError, new_model_id
from tinker_server.auth import current_owner
from tinker_server.runs import Runs
from tinker_server.served import ServedModel
from tinker_server.store import Checkpoint, CheckpointPath, TrainingRun

ARCHIVE_CHUNK_BYTES = 1 << 20
_IMPORT_FILES = {"adapter_config.json", "adapter_model.safetensors"}
_CHECKPOINT_TYPES = {"training": runs_pb2.CHECKPOINT_TYPE_TRAINING, "sampler": runs_pb2.CHECKPOINT_TYPE_SAMPLER}


def checkpoint_message(checkpoint: Checkpoint) -> runs_pb2.Checkpoint:
    message = runs_pb2.Checkpoint(
        checkpoint_id=checkpoint.path.checkpoint_id,
        checkpoint_type=_CHECKPOINT_TYPES[checkpoint.path.checkpoint_type],
        time=checkpoint.created_at,
        tinker_path=str(checkpoint.path),
        size_bytes=checkpoint.size_bytes,
    )
    if checkpoint.expires_at is not None:
        message.expires_at = checkpoint.expires_at
    return message


class RunsServicer(runs_pb2_grpc.RunsServiceServicer):
    def __init__(self, served: ServedModel, runs: Runs, dispatcher: Dispatcher) -> None:
        self._served = served
        self._runs = runs
        self._dispatcher = dispatcher

    def _run_message(self, run: TrainingRun) -> runs_pb2.TrainingRun:
        checkpoints = self._runs.store.checkpoints(run.model_id)
        message = runs_pb2.TrainingRun(
            training_run_id=run.model_id,
            base_model=run.base_model,
            model_owner=run.owner,
            is_lora=True,
            lora_rank=run.lora.rank,
            last_request_time=run.last_request_time,
            user_metadata=run.user_metadata,
            size_bytes=sum(checkpoint.size_bytes for checkpoint in checkpoints),
        )
        for checkpoint in checkpoints:  # oldest first: the last of each kind wins
            field = (
                message.last_checkpoint
                if checkpoint.path.checkpoint_type == "training"
                else message.last_sampler_checkpoint
            )
            field.CopyFrom(checkpoint_message(checkpoint))
        return message

    async def _run_or_abort(self, model_id: str, context: grpc.aio.ServicerContext) -> TrainingRun:
        run = self._runs.owned_run(model_id, current_owner.get())
        if run is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"training_run_id {model_id!r}: no such training run")
        return run

    async def _checkpoint_or_abort(self, text: str, context: grpc.aio.ServicerContext) -> CheckpointPath:
        try:
            path = CheckpointPath.parse(text)
        except ValueError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"tinker_path: {error}")
        if self._runs.owned_run(path.model_id, current_owner.get()) is None or self._runs.checkpoint(path) is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"tinker_path: no checkpoint {text}")
        return path

    async def ListTrainingRuns(
        self, request: runs_pb2.ListTrainingRunsRequest, context: grpc.aio.ServicerContext
    ) -> runs_pb2.ListTrainingRunsResponse:
        limit = request.limit or 20
        if not 1 <= limit <= 1000 or request.offset < 0:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"limit {request.limit} / offset {request.offset}: need 1..1000 / >= 0",
            )
        runs, total = self._runs.store.runs(current_owner.get(), limit, request.offset)
        return runs_pb2.ListTrainingRunsResponse(
            training_runs=[self._run_message(run) for run in runs], total_count=total
        )

    async def GetTrainingRun(
        self, request: runs_pb2.GetTrainingRunRequest, context: grpc.aio.ServicerContext
    ) -> runs_pb2.GetTrainingRunResponse:
        run = await self._run_or_abort(request.training_run_id, context)
        return runs_pb2.GetTrainingRunResponse(training_run=self._run_message(run))

    async def ListCheckpoints(
        self, request: runs_pb2.ListCheckpointsRequest, context: grpc.aio.ServicerContext
    ) -> runs_pb2.ListCheckpointsResponse:
        run = await self._run_or_abort(request.training_run_id, context)
        checkpoints = self._runs.store.checkpoints(run.model_id)
        return runs_pb2.ListCheckpointsResponse(checkpoints=[checkpoint_message(c) for c in checkpoints])

    async def DeleteCheckpoint(
        self, request: runs_pb2.DeleteCheckpointRequest, context: grpc.aio.ServicerContext
    ) -> runs_pb2.DeleteCheckpointResponse:
        path = await self._checkpoint_or_abort(request.tinker_path, context)
        await self._delete(path, context)
        return runs_pb2.DeleteCheckpointResponse()

    async def DeleteRunCheckpoints(
        self, request: runs_pb2.DeleteRunCheckpointsRequest, context: grpc.aio.ServicerContext
    ) -> runs_pb2.DeleteRunCheckpointsResponse:
        run = await self._run_or_abort(request.training_run_id, context)
        checkpoints = self._runs.store.checkpoints(run.model_id)
        for checkpoint in checkpoints:
            await self._delete(checkpoint.path, context)
        return runs_pb2.DeleteRunCheckpointsResponse(deleted=len(checkpoints))

    async def _delete(self, path: CheckpointPath, context: grpc.aio.ServicerContext) -> None:
        try:
            await self._dispatcher.delete_checkpoint(path)
        except RequestError as error:
            await context.abort(error.code, str(error))

    async def DownloadCheckpointArchive(
        self, request: runs_pb2.DownloadCheckpointArchiveRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[runs_pb2.DownloadCheckpointArchiveResponse]:
        path = await self._checkpoint_or_abort(request.tinker_path, context)
        with tempfile.TemporaryFile() as archive:
            total = await asyncio.to_thread(_write_tar, self._runs.directory(path), archive)
            archive.seek(0)
            while chunk := await asyncio.to_thread(archive.read, ARCHIVE_CHUNK_BYTES):
                yield runs_pb2.DownloadCheckpointArchiveResponse(data=chunk, total_bytes=total)

    async def ImportPeftAdapter(
        self, request: runs_pb2.ImportPeftAdapterRequest, context: grpc.aio.ServicerContext
    ) -> runs_pb2.ImportPeftAdapterResponse:
        if set(request.files) != _IMPORT_FILES:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"files: {sorted(request.files)}; expected exactly {sorted(_IMPORT_FILES)}",
            )
        try:
            config = json.loads(request.files["adapter_config.json"])
            rank, alpha = int(config["r"]), float(config.get("lora_alpha", LORA_ALPHA))
        except (ValueError, KeyError, TypeError) as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"files['adapter_config.json']: unreadable ({error})")
        model_id = new_model_id()
        path = CheckpointPath(model_id, "training", "imported")
        directory = self._runs.directory(path)
        directory.mkdir(parents=True)
        for name, content in request.files.items():
            (directory / name).write_bytes(content)
        lora = ops.LoraSpec(rank, 0, False, False, False, alpha)  # the worker reports the real layers
        owner = current_owner.get()
        model = await self._served.wait()
        run = TrainingRun(model_id, owner, model.name, lora, dict(request.user_metadata))
        item = ops.WorkItem("", model_id, ops.CreateAdapter(lora, str(directory)))
        result = await self._dispatcher.submit(ParsedRequest(model_id, item, run=run), owner=owner).result
        if result.HasField("error"):
            self._dispatcher.discard_files(path)
            await context.abort(status_code(result.error.code), f"files: {result.error.message}")
        size = sum(len(content) for content in request.files.values())
        self._runs.store.put_checkpoint(Checkpoint(path, time.time(), size, None))
        return runs_pb2.ImportPeftAdapterResponse(model_id=model_id, path=str(path))


def _write_tar(directory: Path, archive) -> int:
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for file in sorted(directory.iterdir()):
            tar.add(file, arcname=file.name)
    return archive.tell()

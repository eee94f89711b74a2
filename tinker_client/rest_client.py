"""RestClient: training runs and checkpoints, as the Tinker SDK's RestClient has them.

Sync methods return an APIFuture (`.result()`); `_async` methods return the value.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import grpc

from tinker_client import types
from tinker_client._connection import Connection
from tinker_client.errors import error_from_rpc
from tinker_client.futures import APIFuture
from tinker_rpc.v1 import runs_pb2

T = TypeVar("T")
ProgressCallback = Callable[[int, int], None]
"""Called with (bytes received so far, total bytes) after each chunk."""

_CHECKPOINT_TYPES: dict[int, types.CheckpointType] = {
    runs_pb2.CHECKPOINT_TYPE_TRAINING: "training",
    runs_pb2.CHECKPOINT_TYPE_SAMPLER: "sampler",
}


def _time(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=UTC)


def _checkpoint(message: runs_pb2.Checkpoint) -> types.Checkpoint:
    return types.Checkpoint(
        checkpoint_id=message.checkpoint_id,
        checkpoint_type=_CHECKPOINT_TYPES[message.checkpoint_type],
        time=_time(message.time),
        tinker_path=message.tinker_path,
        size_bytes=message.size_bytes,
        expires_at=_time(message.expires_at) if message.HasField("expires_at") else None,
    )


def _training_run(message: runs_pb2.TrainingRun) -> types.TrainingRun:
    return types.TrainingRun(
        training_run_id=message.training_run_id,
        base_model=message.base_model,
        model_owner=message.model_owner,
        is_lora=message.is_lora,
        last_request_time=_time(message.last_request_time),
        lora_rank=message.lora_rank,
        last_checkpoint=_checkpoint(message.last_checkpoint) if message.HasField("last_checkpoint") else None,
        last_sampler_checkpoint=(
            _checkpoint(message.last_sampler_checkpoint) if message.HasField("last_sampler_checkpoint") else None
        ),
        user_metadata=dict(message.user_metadata),
        size_bytes=message.size_bytes,
    )


def run_id_of(tinker_path: str) -> str:
    """The training run a tinker:// path belongs to."""
    if not tinker_path.startswith("tinker://") or "/" not in tinker_path[len("tinker://") :]:
        raise ValueError(f"{tinker_path!r} is not a tinker://<run>/... path")
    return tinker_path[len("tinker://") :].split("/", 1)[0]


class RestClient:
    """>>> rest = service_client.create_rest_client()
    >>> for run in rest.list_training_runs().result().training_runs: print(run.training_run_id)
    """

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._runs = connection.runs

    def _future(self, call: Callable[..., Any], request: Any, convert: Callable[[Any], T]) -> APIFuture[T]:
        return APIFuture(self._connection.unary_future(call, request), convert)

    # -- training runs ---------------------------------------------------------------

    def list_training_runs(self, limit: int = 20, offset: int = 0) -> APIFuture[types.TrainingRunsResponse]:
        request = runs_pb2.ListTrainingRunsRequest(limit=limit, offset=offset)
        return self._future(self._runs.ListTrainingRuns, request, lambda r: _runs_page(r, limit, offset))

    async def list_training_runs_async(self, limit: int = 20, offset: int = 0) -> types.TrainingRunsResponse:
        return await self.list_training_runs(limit, offset)

    def get_training_run(self, training_run_id: str) -> APIFuture[types.TrainingRun]:
        request = runs_pb2.GetTrainingRunRequest(training_run_id=training_run_id)
        return self._future(self._runs.GetTrainingRun, request, lambda response: _training_run(response.training_run))

    async def get_training_run_async(self, training_run_id: str) -> types.TrainingRun:
        return await self.get_training_run(training_run_id)

    def get_training_run_by_tinker_path(self, tinker_path: str) -> APIFuture[types.TrainingRun]:
        return self.get_training_run(run_id_of(tinker_path))

    async def get_training_run_by_tinker_path_async(self, tinker_path: str) -> types.TrainingRun:
        return await self.get_training_run_by_tinker_path(tinker_path)

    # -- checkpoints -----------------------------------------------------------------

    def list_checkpoints(self, training_run_id: str) -> APIFuture[types.CheckpointsListResponse]:
        request = runs_pb2.ListCheckpointsRequest(training_run_id=training_run_id)
        convert = lambda r: types.CheckpointsListResponse([_checkpoint(c) for c in r.checkpoints])  # noqa: E731
        return self._future(self._runs.ListCheckpoints, request, convert)

    async def list_checkpoints_async(self, training_run_id: str) -> types.CheckpointsListResponse:
        return await self.list_checkpoints(training_run_id)

    def delete_checkpoint(self, training_run_id: str, checkpoint_id: str) -> APIFuture[None]:
        """Deletes `checkpoint_id` ("weights/<name>" or "sampler_weights/<name>") of a run."""
        return self.delete_checkpoint_from_tinker_path(f"tinker://{training_run_id}/{checkpoint_id}")

    async def delete_checkpoint_async(self, training_run_id: str, checkpoint_id: str) -> None:
        await self.delete_checkpoint(training_run_id, checkpoint_id)

    def delete_checkpoint_from_tinker_path(self, tinker_path: str) -> APIFuture[None]:
        request = runs_pb2.DeleteCheckpointRequest(tinker_path=tinker_path)
        return self._future(self._runs.DeleteCheckpoint, request, lambda _: None)

    async def delete_checkpoint_from_tinker_path_async(self, tinker_path: str) -> None:
        await self.delete_checkpoint_from_tinker_path(tinker_path)

    def delete_all_checkpoints(self, training_run_id: str) -> APIFuture[int]:
        """Deletes every checkpoint of a run; returns how many there were."""
        request = runs_pb2.DeleteRunCheckpointsRequest(training_run_id=training_run_id)
        return self._future(self._runs.DeleteRunCheckpoints, request, lambda r: r.deleted)

    async def delete_all_checkpoints_async(self, training_run_id: str) -> int:
        return await self.delete_all_checkpoints(training_run_id)

    def download_checkpoint_archive_from_tinker_path(
        self, tinker_path: str, destination: str | Path, progress: ProgressCallback | None = None
    ) -> APIFuture[Path]:
        """Streams the checkpoint as a tar archive (adapter_config.json,
        adapter_model.safetensors, and optimizer.safetensors for `weights`) into `destination`."""
        coroutine = self._download(tinker_path, Path(destination), progress)
        return APIFuture(asyncio.run_coroutine_threadsafe(coroutine, self._connection.loop), lambda path: path)

    async def download_checkpoint_archive_from_tinker_path_async(
        self, tinker_path: str, destination: str | Path, progress: ProgressCallback | None = None
    ) -> Path:
        return await self.download_checkpoint_archive_from_tinker_path(tinker_path, destination, progress)

    async def _download(self, tinker_path: str, destination: Path, progress: ProgressCallback | None) -> Path:
        partial = destination.with_name(destination.name + ".partial")
        received = 0
        try:
            with partial.open("wb") as output:
                request = runs_pb2.DownloadCheckpointArchiveRequest(tinker_path=tinker_path)
                async for chunk in self._runs.DownloadCheckpointArchive(request, metadata=self._connection.metadata):
                    output.write(chunk.data)
                    received += len(chunk.data)
                    if progress is not None:
                        progress(received, chunk.total_bytes)
        except grpc.aio.AioRpcError as error:
            partial.unlink(missing_ok=True)
            raise error_from_rpc(error) from None
        partial.replace(destination)  # only a complete archive gets the final name
        return destination


def _runs_page(response: runs_pb2.ListTrainingRunsResponse, limit: int, offset: int) -> types.TrainingRunsResponse:
    return types.TrainingRunsResponse(
        training_runs=[_training_run(run) for run in response.training_runs],
        cursor=types.Cursor(offset=offset, limit=limit, total_count=response.total_count),
    )

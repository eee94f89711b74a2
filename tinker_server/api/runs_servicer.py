"""RunsService: the records of training runs and checkpoints (the SDK's RestClient)."""

from __future__ import annotations

import asyncio
import functools
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import grpc

from tinker_rpc.v1 import runs_pb2, runs_pb2_grpc
from tinker_server.api.dispatch import Dispatcher, status_code
from tinker_server.api.requests import (
    CONFIG_FILE,
    IMPORT_FILES,
    RequestError,
    RequestParser,
    check_ttl,
    new_model_id,
)
from tinker_server.auth import current_owner
from tinker_server.files import UPLOADS_DIR, write_tar, write_whole
from tinker_server.runs import Runs
from tinker_server.served import ServedModels
from tinker_server.store import Checkpoint, CheckpointPath, RestorePoint, Session, TrainingRun

if TYPE_CHECKING:
    from tinker_server.console.app import Console

ARCHIVE_CHUNK_BYTES = 1 << 20
_CHECKPOINT_TYPES = {
    "training": runs_pb2.CHECKPOINT_TYPE_TRAINING,
    "sampler": runs_pb2.CHECKPOINT_TYPE_SAMPLER,
    "external": runs_pb2.CHECKPOINT_TYPE_EXTERNAL,
}


def checkpoint_message(checkpoint: Checkpoint) -> runs_pb2.Checkpoint:
    message = runs_pb2.Checkpoint(
        checkpoint_id=checkpoint.path.checkpoint_id,
        checkpoint_type=_CHECKPOINT_TYPES[checkpoint.path.checkpoint_type],
        time=checkpoint.created_at,
        tinker_path=str(checkpoint.path),
        size_bytes=checkpoint.size_bytes,
        public=checkpoint.public,
        user_metadata=checkpoint.user_metadata,
    )
    if checkpoint.expires_at is not None:
        message.expires_at = checkpoint.expires_at
    return message


def lora_settings(run: TrainingRun) -> runs_pb2.LoraSettings:
    lora = run.lora
    return runs_pb2.LoraSettings(
        rank=lora.rank, train_mlp=lora.train_mlp, train_attn=lora.train_attn, train_unembed=lora.train_unembed
    )


def _page(request: runs_pb2.ListTrainingRunsRequest | runs_pb2.ListSessionsRequest, default: int) -> tuple[int, int]:
    """(limit, offset) of a listing request; raises RequestError."""
    limit = request.limit or default
    if not 1 <= limit <= 1000 or request.offset < 0:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT, f"limit {request.limit} / offset {request.offset}: need 1..1000 / >= 0"
        )
    return limit, request.offset


class RunsServicer(runs_pb2_grpc.RunsServiceServicer):
    """Owners see their own runs, checkpoints, sessions and samplers; a published checkpoint
    (and the run that holds it) is readable by every key, never writable by another."""

    def __init__(
        self,
        served: ServedModels,
        runs: Runs,
        parser: RequestParser,
        dispatcher: Dispatcher,
        console: Console | None = None,
    ) -> None:
        self._served = served
        self._runs = runs
        self._parser = parser
        self._dispatcher = dispatcher
        self._console = console
        """Serves external checkpoints' files at signed URLs (None: no HTTP, no such URLs)."""

    def _visible_checkpoints(self, run: TrainingRun) -> list[Checkpoint]:
        checkpoints = self._runs.store.checkpoints(run.model_id)
        owned = run.owner == current_owner.get()
        return [checkpoint for checkpoint in checkpoints if owned or checkpoint.public]

    def _run_message(self, run: TrainingRun) -> runs_pb2.TrainingRun:
        checkpoints = self._visible_checkpoints(run)
        message = runs_pb2.TrainingRun(
            training_run_id=run.model_id,
            base_model=run.base_model,
            model_owner=run.owner,
            is_lora=True,
            lora_rank=run.lora.rank,
            last_request_time=run.last_request_time,
            user_metadata=run.user_metadata,
            size_bytes=sum(checkpoint.size_bytes for checkpoint in checkpoints),
            session_id=run.session_id,
            project_id=run.project_id,
            lora=lora_settings(run),
        )
        last = {"training": message.last_checkpoint, "sampler": message.last_sampler_checkpoint}
        for checkpoint in checkpoints:  # oldest first: the last of each kind wins
            if (field := last.get(checkpoint.path.checkpoint_type)) is not None:
                field.CopyFrom(checkpoint_message(checkpoint))
        return message

    def _run(self, model_id: str, readable: bool = False) -> TrainingRun:
        """The caller's run (or, when `readable`, one with a published checkpoint); else NOT_FOUND."""
        run = self._runs.store.run(model_id)
        if run is not None and (run.owner == current_owner.get() or (readable and self._visible_checkpoints(run))):
            return run
        raise RequestError(grpc.StatusCode.NOT_FOUND, f"training_run_id {model_id!r}: no such training run")

    def _checkpoint(self, text: str, writable: bool = False) -> tuple[CheckpointPath, Checkpoint, TrainingRun]:
        """A checkpoint the caller may read (theirs, or published) or, when `writable`, change."""
        try:
            path = CheckpointPath.parse(text)
        except ValueError as error:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"tinker_path: {error}") from error
        found = self._runs.readable_checkpoint(path, current_owner.get())
        if found is None or (writable and found[1].owner != current_owner.get()):
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"tinker_path: no checkpoint {text}")
        return path, *found

    def _session(self, session_id: str) -> Session:
        session = self._runs.store.session(session_id)
        if session is None or session.owner != current_owner.get():
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"session_id {session_id!r}: no such session")
        return session

    async def ListTrainingRuns(
        self, request: runs_pb2.ListTrainingRunsRequest, context: grpc.aio.ServicerContext
    ) -> runs_pb2.ListTrainingRunsResponse:
        limit, offset = _page(request, 20)
        accessible = request.access_scope == runs_pb2.ACCESS_SCOPE_ACCESSIBLE
        runs, total = self._runs.store.runs(current_owner.get(), limit, offset, accessible, request.project_id)
        return runs_pb2.ListTrainingRunsResponse(
            training_runs=[self._run_message(run) for run in runs], total_count=total
        )

    async def GetTrainingRun(
        self, request: runs_pb2.GetTrainingRunRequest, context: grpc.aio.ServicerContext
    ) -> runs_pb2.GetTrainingRunResponse:
        accessible = request.access_scope == runs_pb2.ACCESS_SCOPE_ACCESSIBLE
        run = self._run(request.training_run_id, readable=accessible)
        return runs_pb2.GetTrainingRunResponse(training_run=self._run_message(run))

    async def ListCheckpoints(
        self, request: runs_pb2.ListCheckpointsRequest, context: grpc.aio.ServicerContext
    ) -> runs_pb2.ListCheckpointsResponse:
        run = self._run(request.training_run_id, readable=True)
        checkpoints = self._visible_checkpoints(run)
        return runs_pb2.ListCheckpointsResponse(checkpoints=[checkpoint_message(c) for c in checkpoints])

    async def ListUserCheckpoints(
        self, request: runs_pb2.ListUserCheckpointsRequest, context: grpc.aio.ServicerContext
    ) -> runs_pb2.ListUserCheckpointsResponse:
        limit, offset = _page(request, 100)
        checkpoints, total = self._runs.store.owner_checkpoints(current_owner.get(), limit, offset)
        return runs_pb2.ListUserCheckpointsResponse(
            checkpoints=[checkpoint_message(checkpoint) for checkpoint in checkpoints], total_count=total
        )

    async def GetWeightsInfo(
        self, request: runs_pb2.GetWeightsInfoRequest, context: grpc.aio.ServicerContext
    ) -> runs_pb2.GetWeightsInfoResponse:
        _, _, run = self._checkpoint(request.tinker_path)
        return runs_pb2.GetWeightsInfoResponse(
            base_model=run.base_model, is_lora=True, lora=lora_settings(run), optimizer_type=run.optimizer
        )

    async def DeleteCheckpoint(
        self, request: runs_pb2.DeleteCheckpointRequest, context: grpc.aio.ServicerContext
    ) -> runs_pb2.DeleteCheckpointResponse:
        path, _, _ = self._checkpoint(request.tinker_path, writable=True)
        await self._dispatcher.delete_checkpoint(path)
        return runs_pb2.DeleteCheckpointResponse()

    async def DeleteRunCheckpoints(
        self, request: runs_pb2.DeleteRunCheckpointsRequest, context: grpc.aio.ServicerContext
    ) -> runs_pb2.DeleteRunCheckpointsResponse:
        run = self._run(request.training_run_id)
        checkpoints = self._runs.store.checkpoints(run.model_id)
        for checkpoint in checkpoints:
            await self._dispatcher.delete_checkpoint(checkpoint.path)
        return runs_pb2.DeleteRunCheckpointsResponse(deleted=len(checkpoints))

    async def SetCheckpointPublic(
        self, request: runs_pb2.SetCheckpointPublicRequest, context: grpc.aio.ServicerContext
    ) -> runs_pb2.SetCheckpointPublicResponse:
        path, _, _ = self._checkpoint(request.tinker_path, writable=True)
        self._runs.store.set_checkpoint_public(path, request.public)
        return runs_pb2.SetCheckpointPublicResponse()

    async def SetCheckpointTtl(
        self, request: runs_pb2.SetCheckpointTtlRequest, context: grpc.aio.ServicerContext
    ) -> runs_pb2.SetCheckpointTtlResponse:
        path, _, _ = self._checkpoint(request.tinker_path, writable=True)
        ttl = request.ttl_seconds if request.HasField("ttl_seconds") else None
        check_ttl("ttl_seconds", ttl)
        expires_at = None if ttl is None else time.time() + ttl
        self._runs.store.set_checkpoint_expiry(path, expires_at)
        return runs_pb2.SetCheckpointTtlResponse()

    async def CopyCheckpoint(
        self, request: runs_pb2.CopyCheckpointRequest, context: grpc.aio.ServicerContext
    ) -> runs_pb2.CopyCheckpointResponse:
        """The copy lives in a new run of the caller's that holds only it (continue training
        from it with create_training_client_from_state)."""
        path, original, source = self._checkpoint(request.tinker_path)
        if path.checkpoint_type == "external":  # its run would start from files it cannot load
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"tinker_path: {request.tinker_path} is an export for use elsewhere; copy the run's "
                "tinker://<run>/weights/<name> or sampler_weights/<name> checkpoints",
            )
        ttl = request.ttl_seconds if request.HasField("ttl_seconds") else None
        check_ttl("ttl_seconds", ttl)
        now = time.time()
        copy = CheckpointPath(new_model_id(), path.checkpoint_type, path.name)
        run = TrainingRun(
            copy.model_id,
            current_owner.get(),
            source.base_model,
            source.lora,
            {"copied_from": str(path)},
            project_id=request.project_id,
            optimizer=source.optimizer,
        )
        copy_files = functools.partial(shutil.copytree, self._runs.directory(path), dirs_exist_ok=True)
        await asyncio.to_thread(write_whole, self._runs.directory(copy), copy_files)
        self._runs.store.add_run(run)
        # Training it (by its id) starts from the copy.
        restore = RestorePoint(str(copy), copy.checkpoint_type == "training", original.step)
        self._runs.store.set_restore_point(copy.model_id, restore)
        expires_at = None if ttl is None else now + ttl
        size = await asyncio.to_thread(_directory_bytes, self._runs.directory(copy))
        self._runs.store.put_checkpoint(Checkpoint(copy, now, size, expires_at, step=original.step))
        return runs_pb2.CopyCheckpointResponse(tinker_path=str(copy))

    # -- sessions and samplers -------------------------------------------------------

    async def GetSession(
        self, request: runs_pb2.GetSessionRequest, context: grpc.aio.ServicerContext
    ) -> runs_pb2.GetSessionResponse:
        session = self._session(request.session_id)
        store = self._runs.store
        return runs_pb2.GetSessionResponse(
            training_run_ids=store.session_runs(session.session_id),
            sampler_ids=store.session_samplers(session.session_id),
            user_metadata=session.user_metadata,
            display_name=session.display_name,
            project_id=session.project_id,
            created_at=session.created_at,
            status=session.status,
        )

    async def ListSessions(
        self, request: runs_pb2.ListSessionsRequest, context: grpc.aio.ServicerContext
    ) -> runs_pb2.ListSessionsResponse:
        limit, offset = _page(request, 20)
        session_ids, total = self._runs.store.sessions(current_owner.get(), limit, offset)
        return runs_pb2.ListSessionsResponse(session_ids=session_ids, total_count=total)

    async def AssignSessionProject(
        self, request: runs_pb2.AssignSessionProjectRequest, context: grpc.aio.ServicerContext
    ) -> runs_pb2.AssignSessionProjectResponse:
        session = self._session(request.session_id)
        self._runs.store.assign_session_project(session.session_id, request.project_id)
        return runs_pb2.AssignSessionProjectResponse()

    async def GetSampler(
        self, request: runs_pb2.GetSamplerRequest, context: grpc.aio.ServicerContext
    ) -> runs_pb2.GetSamplerResponse:
        sampler = self._runs.owned_sampler(request.sampler_id, current_owner.get())
        if sampler is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"sampler_id {request.sampler_id!r}: no such sampler")
        return runs_pb2.GetSamplerResponse(
            sampler_id=sampler.sampler_id, base_model=sampler.base_model, model_path=sampler.model_path
        )

    async def Whoami(
        self, request: runs_pb2.WhoamiRequest, context: grpc.aio.ServicerContext
    ) -> runs_pb2.WhoamiResponse:
        return runs_pb2.WhoamiResponse(owner=current_owner.get())

    async def DownloadCheckpointArchive(
        self, request: runs_pb2.DownloadCheckpointArchiveRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[runs_pb2.DownloadCheckpointArchiveResponse]:
        path, _, _ = self._checkpoint(request.tinker_path)
        with tempfile.TemporaryFile() as archive:
            total = await asyncio.to_thread(write_tar, self._runs.directory(path), archive)
            archive.seek(0)
            while chunk := await asyncio.to_thread(archive.read, ARCHIVE_CHUNK_BYTES):
                yield runs_pb2.DownloadCheckpointArchiveResponse(data=chunk, total_bytes=total)

    async def GetExternalWeightsUrls(
        self, request: runs_pb2.GetExternalWeightsUrlsRequest, context: grpc.aio.ServicerContext
    ) -> runs_pb2.GetExternalWeightsUrlsResponse:
        path, _, _ = self._checkpoint(request.tinker_path)
        if path.checkpoint_type != "external":
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"tinker_path: {request.tinker_path} is not external weights (tinker://<run>/external_weights/<name>, "
                "from save_weights_external); download other checkpoints with DownloadCheckpointArchive",
            )
        if self._console is None:
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this server serves no files over HTTP: start it with --console-port (and --console-url where "
                "clients reach it through a proxy) to download external weights; or use DownloadCheckpointArchive",
            )
        urls, expires = self._console.external_urls(path)
        if not urls:  # deleted or expired since it was looked up
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"tinker_path: no checkpoint {request.tinker_path}")
        return runs_pb2.GetExternalWeightsUrlsResponse(urls=urls, expires=expires)

    async def ImportPeftAdapter(
        self, request: runs_pb2.ImportPeftAdapterRequest, context: grpc.aio.ServicerContext
    ) -> runs_pb2.ImportPeftAdapterResponse:
        """A new run from a peft adapter sent in one message (UploadPeftAdapter streams it)."""
        files = dict(request.files)
        write = functools.partial(_write_files, files)
        size = sum(map(len, files.values()))
        metadata = dict(request.user_metadata)
        model_id, path = await self._import(set(files), files.get(CONFIG_FILE), metadata, write, size)
        return runs_pb2.ImportPeftAdapterResponse(model_id=model_id, path=path)

    async def UploadPeftAdapter(
        self, request_iterator: AsyncIterator[runs_pb2.UploadPeftAdapterRequest], context: grpc.aio.ServicerContext
    ) -> runs_pb2.UploadPeftAdapterResponse:
        """A new run from a peft adapter streamed in pieces, received on disk, within the quota."""
        uploads = self._runs.data_dir / UPLOADS_DIR
        uploads.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=uploads) as received:
            received_dir = Path(received)
            limit = self._parser.checkpoint_bytes_left()
            names, metadata, size = await _receive(request_iterator, received_dir, limit)
            config = (received_dir / CONFIG_FILE).read_bytes() if CONFIG_FILE in names else None
            write = functools.partial(_move_files, received_dir, names)
            model_id, path = await self._import(names, config, metadata, write, size)
        return runs_pb2.UploadPeftAdapterResponse(model_id=model_id, path=path)

    async def _import(
        self,
        names: set[str],
        config: bytes | None,
        metadata: dict[str, str],
        write: Callable[[Path], None],
        size: int,
    ) -> tuple[str, str]:
        """Validated and limited as create_model is; the files become the run's `imported`
        checkpoint, whole, and the worker builds the run from them."""
        await self._served.wait()
        self._dispatcher.check_accepting()
        parsed, path = self._parser.import_adapter(names, config, metadata)
        await asyncio.to_thread(write_whole, self._runs.directory(path), write)
        result = await self._dispatcher.submit(parsed, current_owner.get()).result
        if result.HasField("error"):
            self._dispatcher.discard_files(path)
            raise RequestError(status_code(result.error.code), f"files: {result.error.message}")
        self._runs.store.put_checkpoint(Checkpoint(path, time.time(), size, None))
        return parsed.run.model_id, str(path)


async def _receive(
    pieces: AsyncIterator[runs_pb2.UploadPeftAdapterRequest], directory: Path, limit: int
) -> tuple[set[str], dict[str, str], int]:
    """Appends each piece to its file in `directory`; (file names, labels, bytes received)."""
    handles: dict[str, BinaryIO] = {}
    metadata: dict[str, str] | None = None
    size = 0
    try:
        async for piece in pieces:
            if metadata is None:
                metadata = dict(piece.user_metadata)
            if piece.file not in IMPORT_FILES:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"file: {piece.file!r}; expected one of {sorted(IMPORT_FILES)}"
                )
            size += len(piece.data)
            if size > limit:
                raise RequestError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the upload passed {limit} bytes, what your checkpoint quota per owner "
                    "(--max-checkpoint-bytes-per-owner) has left",
                )
            if piece.file not in handles:
                handles[piece.file] = (directory / piece.file).open("wb")
            await asyncio.to_thread(handles[piece.file].write, piece.data)
    finally:
        for handle in handles.values():
            handle.close()
    return set(handles), metadata or {}, size


def _write_files(files: dict[str, bytes], directory: Path) -> None:
    for name, content in files.items():
        (directory / name).write_bytes(content)


def _move_files(source: Path, names: set[str], directory: Path) -> None:
    for name in names:
        shutil.move(source / name, directory / name)


def _directory_bytes(directory: Path) -> int:
    return sum(file.stat().st_size for file in directory.iterdir())

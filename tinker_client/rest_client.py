"""RestClient: training runs, checkpoints, sessions and samplers, as the Tinker SDK's RestClient
has them. Sync methods return an APIFuture (`.result()`, or `await` it); `_async` methods
return the value.

>>> rest = RestClient(base_url="localhost:50051")
>>> for run in rest.list_training_runs().result().training_runs: print(run.training_run_id)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import date, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

import grpc

from tinker_client import _convert, types
from tinker_client._connection import Connection, ConnectionSettings
from tinker_client.errors import UnsupportedFeatureError, error_from_rpc
from tinker_client.futures import APIFuture, AwaitableConcurrentFuture
from tinker_rpc.v1 import runs_pb2

T = TypeVar("T")
AccessScope = Literal["owned", "accessible"]
AuditEventType = Literal["all", "checkpoints", "projects", "teams", "organizations"]
ProgressCallback = Callable[[int, int], None]
"""Called with (bytes received so far, total bytes) after each chunk."""

_ACCESS_SCOPES = {"owned": runs_pb2.ACCESS_SCOPE_OWNED, "accessible": runs_pb2.ACCESS_SCOPE_ACCESSIBLE}


def run_id_of(tinker_path: str) -> str:
    """The training run a tinker:// path belongs to."""
    if not tinker_path.startswith("tinker://") or "/" not in tinker_path[len("tinker://") :]:
        raise ValueError(f"{tinker_path!r} is not a tinker://<run>/... path")
    return tinker_path[len("tinker://") :].split("/", 1)[0]


def _scope(access_scope: AccessScope) -> int:
    if access_scope not in _ACCESS_SCOPES:
        raise ValueError(f"access_scope: {access_scope!r}; expected 'owned' or 'accessible'")
    return _ACCESS_SCOPES[access_scope]


def hosted_only(feature: str) -> UnsupportedFeatureError:
    return UnsupportedFeatureError(f"{feature}: a feature of the hosted Tinker service that a self-hosted server lacks")


class RestClient:
    """Reads and manages what the server keeps: runs, checkpoints, sessions, samplers."""

    def __init__(
        self,
        _connection: Connection | None = None,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        tls_root_certificates: bytes | None = None,
    ) -> None:
        """Made by `ServiceClient.create_rest_client()`, or on its own from `base_url` and
        `api_key` (defaults: $TINKER_BASE_URL, $TINKER_API_KEY)."""
        if _connection is None:
            _connection = ConnectionSettings.resolve(base_url, api_key, tls_root_certificates).connect()
        self._connection = _connection
        self._runs = _connection.runs

    def _future(self, call: Callable[..., Any], request: Any, convert: Callable[[Any], T]) -> APIFuture[T]:
        return AwaitableConcurrentFuture(self._connection.unary_future(call, request), convert=convert)

    def get_telemetry(self) -> None:
        """This SDK sends no telemetry."""
        return None

    def get_server_capabilities(self) -> APIFuture[types.GetServerCapabilitiesResponse]:
        return AwaitableConcurrentFuture(self._connection.capabilities(fresh=True), convert=_convert.capabilities)

    def whoami(self) -> APIFuture[types.WhoamiResponse]:
        return self._future(self._runs.Whoami, runs_pb2.WhoamiRequest(), _convert.whoami)

    # -- training runs ---------------------------------------------------------------

    def list_training_runs(
        self, limit: int = 20, offset: int = 0, access_scope: AccessScope = "owned", project_id: str | None = None
    ) -> APIFuture[types.TrainingRunsResponse]:
        """Runs newest first; `accessible` adds other owners' runs that have a published
        checkpoint; `project_id` keeps one project's runs."""
        request = runs_pb2.ListTrainingRunsRequest(
            limit=limit, offset=offset, access_scope=_scope(access_scope), project_id=project_id or ""
        )
        return self._future(self._runs.ListTrainingRuns, request, lambda r: _convert.runs_page(r, limit, offset))

    async def list_training_runs_async(
        self, limit: int = 20, offset: int = 0, access_scope: AccessScope = "owned", project_id: str | None = None
    ) -> types.TrainingRunsResponse:
        return await self.list_training_runs(limit, offset, access_scope, project_id)

    def get_training_run(
        self, training_run_id: types.ModelID, access_scope: AccessScope = "owned"
    ) -> APIFuture[types.TrainingRun]:
        request = runs_pb2.GetTrainingRunRequest(training_run_id=training_run_id, access_scope=_scope(access_scope))
        return self._future(self._runs.GetTrainingRun, request, lambda r: _convert.training_run(r.training_run))

    async def get_training_run_async(
        self, training_run_id: types.ModelID, access_scope: AccessScope = "owned"
    ) -> types.TrainingRun:
        return await self.get_training_run(training_run_id, access_scope)

    def get_training_run_by_tinker_path(
        self, tinker_path: str, access_scope: AccessScope = "owned"
    ) -> APIFuture[types.TrainingRun]:
        return self.get_training_run(run_id_of(tinker_path), access_scope)

    async def get_training_run_by_tinker_path_async(
        self, tinker_path: str, access_scope: AccessScope = "owned"
    ) -> types.TrainingRun:
        return await self.get_training_run_by_tinker_path(tinker_path, access_scope)

    def get_weights_info_by_tinker_path(self, tinker_path: str) -> APIFuture[types.WeightsInfoResponse]:
        """Base model and LoRA settings of a checkpoint (yours, or a published one)."""
        request = runs_pb2.GetWeightsInfoRequest(tinker_path=tinker_path)
        return self._future(self._runs.GetWeightsInfo, request, _convert.weights_info)

    # -- checkpoints -----------------------------------------------------------------

    def list_checkpoints(self, training_run_id: types.ModelID) -> APIFuture[types.CheckpointsListResponse]:
        request = runs_pb2.ListCheckpointsRequest(training_run_id=training_run_id)
        convert = lambda r: types.CheckpointsListResponse([_convert.checkpoint(c) for c in r.checkpoints])  # noqa: E731
        return self._future(self._runs.ListCheckpoints, request, convert)

    async def list_checkpoints_async(self, training_run_id: types.ModelID) -> types.CheckpointsListResponse:
        return await self.list_checkpoints(training_run_id)

    def list_user_checkpoints(self, limit: int = 100, offset: int = 0) -> APIFuture[types.CheckpointsListResponse]:
        """All your checkpoints, newest first."""
        request = runs_pb2.ListUserCheckpointsRequest(limit=limit, offset=offset)
        return self._future(
            self._runs.ListUserCheckpoints, request, lambda r: _convert.checkpoints_page(r, limit, offset)
        )

    async def list_user_checkpoints_async(self, limit: int = 100, offset: int = 0) -> types.CheckpointsListResponse:
        return await self.list_user_checkpoints(limit, offset)

    def delete_checkpoint(self, training_run_id: types.ModelID, checkpoint_id: str) -> APIFuture[None]:
        """Deletes `checkpoint_id` ("weights/<name>" or "sampler_weights/<name>") of a run."""
        return self.delete_checkpoint_from_tinker_path(f"tinker://{training_run_id}/{checkpoint_id}")

    async def delete_checkpoint_async(self, training_run_id: types.ModelID, checkpoint_id: str) -> None:
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

    def _set_public(self, tinker_path: str, public: bool) -> APIFuture[None]:
        request = runs_pb2.SetCheckpointPublicRequest(tinker_path=tinker_path, public=public)
        return self._future(self._runs.SetCheckpointPublic, request, lambda _: None)

    def publish_checkpoint_from_tinker_path(self, tinker_path: str) -> APIFuture[None]:
        """Makes your checkpoint readable (never writable) by every API key of the server."""
        return self._set_public(tinker_path, True)

    async def publish_checkpoint_from_tinker_path_async(self, tinker_path: str) -> None:
        await self.publish_checkpoint_from_tinker_path(tinker_path)

    def unpublish_checkpoint_from_tinker_path(self, tinker_path: str) -> APIFuture[None]:
        return self._set_public(tinker_path, False)

    async def unpublish_checkpoint_from_tinker_path_async(self, tinker_path: str) -> None:
        await self.unpublish_checkpoint_from_tinker_path(tinker_path)

    def set_checkpoint_ttl_from_tinker_path(self, tinker_path: str, ttl_seconds: int | None) -> APIFuture[None]:
        """The checkpoint is deleted `ttl_seconds` from now; None keeps it until deleted."""
        request = runs_pb2.SetCheckpointTtlRequest(tinker_path=tinker_path, ttl_seconds=ttl_seconds)
        return self._future(self._runs.SetCheckpointTtl, request, lambda _: None)

    async def set_checkpoint_ttl_from_tinker_path_async(self, tinker_path: str, ttl_seconds: int | None) -> None:
        await self.set_checkpoint_ttl_from_tinker_path(tinker_path, ttl_seconds)

    def copy_weights(
        self,
        path: str,
        destination_project_id: str | None = None,
        *,
        ttl_seconds: int | None = None,
        weights_access_token: str | None = None,
    ) -> APIFuture[str]:
        """Copies a checkpoint (yours, or a published one) into a new run of yours; the future
        gives the copy's tinker:// path."""
        from tinker_client.training_client import check_access_token

        check_access_token(weights_access_token)
        request = runs_pb2.CopyCheckpointRequest(
            tinker_path=path, ttl_seconds=ttl_seconds, project_id=destination_project_id or ""
        )
        return self._future(self._runs.CopyCheckpoint, request, lambda r: r.tinker_path)

    async def copy_weights_async(
        self,
        path: str,
        destination_project_id: str | None = None,
        *,
        ttl_seconds: int | None = None,
        weights_access_token: str | None = None,
    ) -> str:
        return await self.copy_weights(
            path, destination_project_id, ttl_seconds=ttl_seconds, weights_access_token=weights_access_token
        )

    def download_checkpoint_archive_from_tinker_path(
        self, tinker_path: str, destination: str | Path, progress: ProgressCallback | None = None
    ) -> APIFuture[Path]:
        """Streams the checkpoint as a tar archive (adapter_config.json,
        adapter_model.safetensors, and optimizer.safetensors for `weights`) into `destination`."""
        coroutine = self._download(tinker_path, Path(destination), progress)
        return AwaitableConcurrentFuture(asyncio.run_coroutine_threadsafe(coroutine, self._connection.loop))

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

    def get_external_weights_urls(self, tinker_path: str) -> APIFuture[types.ExternalWeightsUrlsResponse]:
        """Signed HTTP URLs, one per file, of external weights (TrainingClient.save_weights_external):
        a plain GET fetches each until `expires`. The server's web console serves them
        (`--console-port`)."""
        request = runs_pb2.GetExternalWeightsUrlsRequest(tinker_path=tinker_path)
        return self._future(self._runs.GetExternalWeightsUrls, request, _convert.external_weights_urls)

    async def get_external_weights_urls_async(self, tinker_path: str) -> types.ExternalWeightsUrlsResponse:
        return await self.get_external_weights_urls(tinker_path)

    # -- sessions and samplers -------------------------------------------------------

    def get_session(self, session_id: str, access_scope: AccessScope = "owned") -> APIFuture[types.GetSessionResponse]:
        """A session of yours: the runs and samplers it created. (Sessions are never shared,
        so `accessible` finds the same ones.)"""
        _scope(access_scope)
        request = runs_pb2.GetSessionRequest(session_id=session_id)
        return self._future(self._runs.GetSession, request, _convert.session)

    async def get_session_async(self, session_id: str, access_scope: AccessScope = "owned") -> types.GetSessionResponse:
        return await self.get_session(session_id, access_scope)

    def list_sessions(
        self, limit: int = 20, offset: int = 0, access_scope: AccessScope = "owned"
    ) -> APIFuture[types.ListSessionsResponse]:
        """Your sessions, newest first. (Sessions are never shared: `accessible` lists the same.)"""
        _scope(access_scope)
        request = runs_pb2.ListSessionsRequest(limit=limit, offset=offset)
        return self._future(self._runs.ListSessions, request, lambda r: types.ListSessionsResponse(list(r.session_ids)))

    async def list_sessions_async(
        self, limit: int = 20, offset: int = 0, access_scope: AccessScope = "owned"
    ) -> types.ListSessionsResponse:
        return await self.list_sessions(limit, offset, access_scope)

    def assign_session_project(self, session_id: str, project_id: str) -> APIFuture[None]:
        """Moves a session of yours, with its runs, into `project_id`."""
        request = runs_pb2.AssignSessionProjectRequest(session_id=session_id, project_id=project_id)
        return self._future(self._runs.AssignSessionProject, request, lambda _: None)

    async def assign_session_project_async(self, session_id: str, project_id: str) -> None:
        await self.assign_session_project(session_id, project_id)

    def get_sampler(self, sampler_id: str) -> APIFuture[types.GetSamplerResponse]:
        request = runs_pb2.GetSamplerRequest(sampler_id=sampler_id)
        return self._future(self._runs.GetSampler, request, _convert.sampler)

    async def get_sampler_async(self, sampler_id: str) -> types.GetSamplerResponse:
        return await self.get_sampler(sampler_id)

    def export_session_trace(self, session_id: str) -> APIFuture[str]:
        raise hosted_only("export_session_trace (session traces)")

    async def export_session_trace_async(self, session_id: str) -> str:
        return await self.export_session_trace(session_id)

    def search_sessions(self, request: Any) -> APIFuture[Any]:
        raise hosted_only("search_sessions (session search)")

    # -- administration (AdminClient's; kept here as in Tinker 0.38) -----------------

    def get_audit_log(self, event_type: AuditEventType = "all", day: date | None = None) -> APIFuture[Any]:
        raise hosted_only("get_audit_log (audit logs)")

    async def get_audit_log_async(self, event_type: AuditEventType = "all", day: date | None = None) -> Any:
        return await self.get_audit_log(event_type, day)

    def get_billing_usage(self, starting_on: datetime | str, ending_before: datetime | str) -> APIFuture[Any]:
        raise hosted_only("get_billing_usage (billing)")

    async def get_billing_usage_async(self, starting_on: datetime | str, ending_before: datetime | str) -> Any:
        return await self.get_billing_usage(starting_on, ending_before)

    def get_current_checkpoint_storage_usage(
        self, project_id: str | None = None
    ) -> APIFuture[types.CurrentCheckpointStorageUsageResponse]:
        """Your checkpoints' count and bytes on disk, per project (no cost: self-hosted)."""

        async def usage() -> types.CurrentCheckpointStorageUsageResponse:
            runs = await self._all_runs(project_id)
            by_project: dict[str, list[types.TrainingRun]] = {}
            for run in runs:
                by_project.setdefault(run.project_id or "", []).append(run)
            items = []
            for project, project_runs in sorted(by_project.items()):
                checkpoints = [
                    checkpoint
                    for run in project_runs
                    for checkpoint in (await self.list_checkpoints(run.training_run_id)).checkpoints
                ]
                size = sum(checkpoint.size_bytes or 0 for checkpoint in checkpoints)
                items.append(
                    types.CurrentCheckpointStorageUsageItem(len(checkpoints), size, size / 1e9, project or None)
                )
            return types.CurrentCheckpointStorageUsageResponse(items)

        return AwaitableConcurrentFuture(asyncio.run_coroutine_threadsafe(usage(), self._connection.loop))

    async def get_current_checkpoint_storage_usage_async(
        self, project_id: str | None = None
    ) -> types.CurrentCheckpointStorageUsageResponse:
        return await self.get_current_checkpoint_storage_usage(project_id)

    async def _all_runs(self, project_id: str | None) -> list[types.TrainingRun]:
        runs: list[types.TrainingRun] = []
        while True:
            page = await self.list_training_runs(1000, len(runs), project_id=project_id)
            runs.extend(page.training_runs)
            if len(runs) >= page.cursor.total_count or not page.training_runs:
                return runs

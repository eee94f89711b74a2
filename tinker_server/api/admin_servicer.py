"""The AdminService: the replicas, and moving training runs between them (for operators)."""

from __future__ import annotations

import grpc

from tinker_rpc.v1 import admin_pb2, admin_pb2_grpc
from tinker_server.api.requests import RequestError
from tinker_server.auth import ApiKeys, current_owner
from tinker_server.fleet import Fleet, ReplicaStatus


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, fleet: Fleet, api_keys: ApiKeys, admin_owners: frozenset[str]) -> None:
        self._fleet = fleet
        self._api_keys = api_keys
        self._admin_owners = admin_owners

    async def _check_admin(self, context: grpc.aio.ServicerContext) -> None:
        if not self._api_keys.open and current_owner.get() not in self._admin_owners:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED, "the AdminService is for the owners named with --admin-owner"
            )

    async def ListReplicas(
        self, request: admin_pb2.ListReplicasRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListReplicasResponse:
        await self._check_admin(context)
        return admin_pb2.ListReplicasResponse(replicas=[_replica(status) for status in self._fleet.statuses()])

    async def AddReplica(
        self, request: admin_pb2.AddReplicaRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.AddReplicaResponse:
        await self._check_admin(context)
        try:
            slot = await self._fleet.add_replica(request.base_model)
        except RequestError as error:
            await context.abort(error.code, str(error))
        except RuntimeError as error:  # the new worker could not load the model
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the new replica did not start: {error}")
        status = next(status for status in self._fleet.statuses() if status.replica_id == slot.replica_id)
        return admin_pb2.AddReplicaResponse(replica=_replica(status))

    async def DrainReplica(
        self, request: admin_pb2.DrainReplicaRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.DrainReplicaResponse:
        await self._check_admin(context)
        try:
            moved = await self._fleet.drain(request.replica_id)
        except RequestError as error:
            await context.abort(error.code, str(error))
        return admin_pb2.DrainReplicaResponse(model_ids=moved)

    async def MigrateRun(
        self, request: admin_pb2.MigrateRunRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.MigrateRunResponse:
        await self._check_admin(context)
        try:
            placement = await self._fleet.migrate(request.model_id, request.replica_id or None)
        except RequestError as error:
            await context.abort(error.code, str(error))
        return admin_pb2.MigrateRunResponse(replica_id=placement.replica, epoch=placement.epoch)

    async def Rebalance(
        self, request: admin_pb2.RebalanceRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.RebalanceResponse:
        await self._check_admin(context)
        try:
            moved = await self._fleet.rebalance(request.base_model)
        except RequestError as error:
            await context.abort(error.code, str(error))
        return admin_pb2.RebalanceResponse(model_ids=moved)


def _replica(status: ReplicaStatus) -> admin_pb2.Replica:
    return admin_pb2.Replica(
        replica_id=status.replica_id,
        base_model=status.base_model,
        location=status.location,
        model_ids=status.runs,
        queued=status.queued,
        state=status.state,
    )

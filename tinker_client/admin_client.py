"""AdminClient: Tinker's organisation-level reports. Billing and audit logs belong to the
hosted service; checkpoint storage usage is reported from this server's records."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from tinker_client import types
from tinker_client._connection import Connection
from tinker_client.futures import APIFuture
from tinker_client.rest_client import AuditEventType, RestClient


class AdminClient:
    def __init__(
        self,
        _connection: Connection | None = None,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        tls_root_certificates: bytes | None = None,
    ) -> None:
        self._rest = RestClient(
            _connection, base_url=base_url, api_key=api_key, tls_root_certificates=tls_root_certificates
        )

    def get_telemetry(self) -> None:
        """This SDK sends no telemetry."""
        return None

    def get_audit_log(self, event_type: AuditEventType = "all", day: date | None = None) -> APIFuture[Any]:
        return self._rest.get_audit_log(event_type, day)

    async def get_audit_log_async(self, event_type: AuditEventType = "all", day: date | None = None) -> Any:
        return await self.get_audit_log(event_type, day)

    def get_billing_usage(self, starting_on: datetime | str, ending_before: datetime | str) -> APIFuture[Any]:
        return self._rest.get_billing_usage(starting_on, ending_before)

    async def get_billing_usage_async(self, starting_on: datetime | str, ending_before: datetime | str) -> Any:
        return await self.get_billing_usage(starting_on, ending_before)

    def get_current_checkpoint_storage_usage(
        self, project_id: str | None = None
    ) -> APIFuture[types.CurrentCheckpointStorageUsageResponse]:
        return self._rest.get_current_checkpoint_storage_usage(project_id)

    async def get_current_checkpoint_storage_usage_async(
        self, project_id: str | None = None
    ) -> types.CurrentCheckpointStorageUsageResponse:
        return await self.get_current_checkpoint_storage_usage(project_id)

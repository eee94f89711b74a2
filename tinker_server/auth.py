"""API keys: `authorization: Bearer <key>` metadata, checked by an interceptor on every call
(`api.interceptors.AuthInterceptor`).

Each key belongs to an owner; every run, checkpoint and future records its owner, and the
servicers read the caller's owner from `current_owner`. Other owners' resources answer
NOT_FOUND, so their existence does not leak.
"""

from __future__ import annotations

import contextvars
import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ANONYMOUS = ""
current_owner: contextvars.ContextVar[str] = contextvars.ContextVar("current_owner", default=ANONYMOUS)
# Standard services that load balancers and tools call without a key.
PUBLIC_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


@dataclass(frozen=True)
class ApiKeys:
    """key -> owner; `open` serves everyone as the anonymous owner."""

    owners: dict[str, str]
    open: bool = False

    @classmethod
    def load(cls, keys_file: Path | None, keys_env: str | None, allow_unauthenticated: bool) -> ApiKeys:
        """Keys from a file ('KEY OWNER' per line, # comments) and/or 'KEY=OWNER,...'."""
        owners: dict[str, str] = {}
        if keys_file is not None:
            for number, line in enumerate(keys_file.read_text().splitlines(), start=1):
                line = line.split("#", 1)[0].strip()
                if not line:
                    continue
                parts = line.split()
                if len(parts) != 2:
                    raise ValueError(f"{keys_file}:{number}: expected 'KEY OWNER'")
                owners[parts[0]] = parts[1]
        for entry in filter(None, (keys_env or "").split(",")):
            key, separator, owner = entry.strip().partition("=")
            if not separator or not key or not owner:
                raise ValueError("TINKER_API_KEYS: expected 'KEY=OWNER' entries separated by commas")
            owners[key] = owner
        if not owners and not allow_unauthenticated:
            raise ValueError(
                "no API keys configured: pass --api-keys-file, set TINKER_API_KEYS, "
                "or run open with --allow-unauthenticated"
            )
        return cls(owners, open=not owners)

    def owner(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
        if self.open:
            return ANONYMOUS
        header = next((value for key, value in metadata or () if key == "authorization"), None)
        if not isinstance(header, str) or not header.startswith("Bearer "):
            return None
        return self.owner_of_key(header.removeprefix("Bearer "))

    def owner_of_key(self, given: str) -> str | None:
        """The key's owner (the anonymous owner when the server is open); None for no one's key."""
        if self.open:
            return ANONYMOUS
        # Constant-time comparison against every key: no timing hint about near misses.
        matches = [owner for key, owner in self.owners.items() if hmac.compare_digest(key.encode(), given.encode())]
        return matches[0] if matches else None

"""Console sign-in: an API key, checked like the gRPC API checks it, buys a random session
token (the cookie); sessions live in memory and expire, so a restart signs everyone out."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

from tinker_server.auth import ANONYMOUS, ApiKeys

COOKIE = "tinker_console_session"
SESSION_SECONDS = 12 * 3600.0


@dataclass(frozen=True)
class Visitor:
    """Who is looking: an owner sees their own runs; an admin also every run and the server."""

    owner: str
    admin: bool

    def may_see(self, owner: str) -> bool:
        return self.admin or owner == self.owner


class Sessions:
    def __init__(self, api_keys: ApiKeys, admin_owners: frozenset[str], lifetime: float = SESSION_SECONDS) -> None:
        self._api_keys = api_keys
        self._admin_owners = admin_owners
        self._lifetime = lifetime
        self._sessions: dict[str, tuple[Visitor, float]] = {}  # token -> (visitor, expires at)

    @property
    def open(self) -> bool:
        """The server runs without keys: everyone is the anonymous owner, and admin (as for the AdminService)."""
        return self._api_keys.open

    def sign_in(self, api_key: str) -> str | None:
        """A new session's token, or None for a key that is no one's."""
        owner = self._api_keys.owner_of_key(api_key)
        if owner is None:
            return None
        now = time.monotonic()
        self._sessions = {token: entry for token, entry in self._sessions.items() if entry[1] > now}
        token = secrets.token_urlsafe(32)
        self._sessions[token] = (Visitor(owner, owner in self._admin_owners), now + self._lifetime)
        return token

    def visitor(self, token: str | None) -> Visitor | None:
        if self.open:
            return Visitor(ANONYMOUS, admin=True)
        visitor, expires = self._sessions.get(token or "", (None, 0.0))
        return visitor if expires > time.monotonic() else None

    def sign_out(self, token: str | None) -> None:
        self._sessions.pop(token or "", None)

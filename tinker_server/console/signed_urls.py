"""URLs that carry their own authorisation (as a bucket's signed URLs do): an HMAC of what they
name and when they expire, under a key of this server process. Whoever holds one may GET it until
then, with no API key (a download tool, `urllib`); a restart ends the URLs given before it, and
asking again gives new ones."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from urllib.parse import urlencode


class UrlSigner:
    def __init__(self, lifetime_seconds: float) -> None:
        self.lifetime_seconds = lifetime_seconds
        self._key = secrets.token_bytes(32)

    def query(self, resource: str) -> tuple[str, float]:
        """The query string that authorises GETs of `resource` (a path) until the time returned."""
        expires = int(time.time() + self.lifetime_seconds)
        return urlencode({"expires": expires, "signature": self._signature(resource, expires)}), float(expires)

    def allows(self, resource: str, expires: str, signature: str) -> bool:
        """Whether a query's `expires` and `signature` authorise a GET of `resource` now."""
        # (anyone may send anything here: only ASCII digits of a plausible length are a time)
        if not (expires.isascii() and expires.isdigit() and len(expires) <= 12) or int(expires) < time.time():
            return False
        return hmac.compare_digest(signature.encode(), self._signature(resource, int(expires)).encode())

    def _signature(self, resource: str, expires: int) -> str:
        return hmac.new(self._key, f"{resource}\n{expires}".encode(), hashlib.sha256).hexdigest()

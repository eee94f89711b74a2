"""The console's HTTP server: aiohttp on the server's own event loop, pages rendered from Jinja
templates (every value escaped: run metadata is the users' text), a small script that draws
and refreshes the curves, and no file fetched from anywhere else (it works offline)."""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
from aiohttp import web

from tinker_server.console.queries import SERIES, ConsoleQueries
from tinker_server.console.sessions import COOKIE, SESSION_SECONDS, Sessions, Visitor
from tinker_server.console.signed_urls import UrlSigner
from tinker_server.files import write_tar
from tinker_server.ops import LoraSpec
from tinker_server.store import CheckpointPath, is_safe_name

HERE = Path(__file__).parent
DOWNLOAD_CHUNK_BYTES = 1 << 20
EXTERNAL_URL_SECONDS = 3600.0
"""How long a signed URL of an external checkpoint's file works."""
# No script, style or frame from elsewhere, no inline script: a value that slipped through
# escaping still could not run.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}
SERIES_TITLES = {
    "loss_per_token": "Loss per token",
    "grad_norm": "Gradient norm",
    "learning_rate": "Learning rate",
    "tokens": "Tokens per step",
}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Console:
    def __init__(self, queries: ConsoleQueries, sessions: Sessions, public_url: str = "") -> None:
        self._queries = queries
        self._sessions = sessions
        self._public_url = public_url.rstrip("/")
        self._signer = UrlSigner(EXTERNAL_URL_SECONDS)
        self._runner: web.AppRunner | None = None
        self._templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True, undefined=jinja2.StrictUndefined
        )
        self._templates.filters.update(when=_when, size=_size, expiry=_expiry, lora=_lora)
        self.url = ""
        """The base URL clients are given (set by `start`)."""

    async def start(self, host: str, port: int) -> str:
        """Serves on host:port (0 picks a free port); returns the console's base URL."""
        app = web.Application(middlewares=[_security_headers])
        app.add_routes(
            [
                web.get("/", self._home),
                web.get("/signin", self._sign_in_form),
                web.post("/signin", self._sign_in),
                web.post("/signout", self._sign_out),
                web.get("/runs", self._signed_in(self._runs_page)),
                web.get("/runs/{model_id}", self._signed_in(self._run_page)),
                web.get("/runs/{model_id}/metrics.json", self._signed_in(self._metrics)),
                web.get("/runs/{model_id}/checkpoints/{segment}/{name}", self._signed_in(self._download)),
                web.get("/server", self._signed_in(self._server_page)),
                web.get("/external/{model_id}/{name}/{file}", self._external_file),
                web.static("/static", HERE / "static"),
            ]
        )
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound_port = self._runner.addresses[0][1]
        self.url = self._public_url or f"http://{host}:{bound_port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def external_urls(self, path: CheckpointPath) -> tuple[dict[str, str], float]:
        """A signed URL per file of an external checkpoint (the caller may read it), and when they
        expire; none where it is gone (deleted, or expired)."""
        directory = self._queries.external_files(path)
        urls, expires = {}, 0.0
        for file in sorted(entry.name for entry in directory.iterdir()) if directory is not None else []:
            resource = f"/external/{path.model_id}/{path.name}/{file}"
            query, expires = self._signer.query(resource)
            urls[file] = f"{self.url}{resource}?{query}"
        return urls, expires

    async def _external_file(self, request: web.Request) -> web.StreamResponse:
        """A file of an external checkpoint, to whoever holds a signed URL of it (no sign-in)."""
        model_id, name, file = (request.match_info[key] for key in ("model_id", "name", "file"))
        if not self._signer.allows(request.path, request.query.get("expires", ""), request.query.get("signature", "")):
            raise web.HTTPForbidden(text="this URL is unsigned or expired: get new ones (get_external_weights_urls)")
        names_safe = all(map(is_safe_name, (model_id, name, file)))
        directory = self._queries.external_files(CheckpointPath(model_id, "external", name)) if names_safe else None
        if directory is None or not (directory / file).is_file():
            raise web.HTTPNotFound(text="no such file: the checkpoint was deleted")
        return web.FileResponse(directory / file, headers={"Content-Type": "application/octet-stream"})

    # -- signing in ------------------------------------------------------------------

    def _visitor(self, request: web.Request) -> Visitor | None:
        return self._sessions.visitor(request.cookies.get(COOKIE))

    def _signed_in(self, page: Callable[[web.Request, Visitor], Awaitable[web.StreamResponse]]) -> Handler:
        """A page for signed-in visitors; others are sent to sign in (a script's fetch gets 401)."""

        async def handler(request: web.Request) -> web.StreamResponse:
            visitor = self._visitor(request)
            if visitor is not None:
                return await page(request, visitor)
            if request.path.endswith(".json"):
                return web.json_response({"error": "sign in again: your console session ended"}, status=401)
            raise web.HTTPSeeOther(f"/signin?{urlencode({'next': request.path_qs})}")

        return handler

    async def _home(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPSeeOther("/runs")

    async def _sign_in_form(self, request: web.Request) -> web.StreamResponse:
        if self._sessions.open:
            raise web.HTTPSeeOther("/runs")
        return self._render(request, "signin.html", None, next=_local_path(request.query.get("next")), error="")

    async def _sign_in(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        target = _local_path(str(form.get("next", "")))
        token = self._sessions.sign_in(str(form.get("api_key", "")).strip())
        if token is None:
            error = "That API key is not valid here."
            return self._render(request, "signin.html", None, status=401, next=target, error=error)
        response = web.HTTPSeeOther(target)
        secure = self.url.startswith("https://")
        response.set_cookie(
            COOKIE, token, max_age=int(SESSION_SECONDS), httponly=True, samesite="Strict", secure=secure, path="/"
        )
        raise response

    async def _sign_out(self, request: web.Request) -> web.StreamResponse:
        self._sessions.sign_out(request.cookies.get(COOKIE))
        response = web.HTTPSeeOther("/signin")
        response.del_cookie(COOKIE, path="/")
        raise response

    # -- pages -----------------------------------------------------------------------

    async def _runs_page(self, request: web.Request, visitor: Visitor) -> web.StreamResponse:
        rows, total = self._queries.runs(visitor)
        return self._render(request, "runs.html", visitor, rows=rows, total=total)

    async def _run_page(self, request: web.Request, visitor: Visitor) -> web.StreamResponse:
        row = self._queries.run(visitor, request.match_info["model_id"])
        if row is None:
            return self._not_found(request, visitor)
        model_id = row.run.model_id
        return self._render(
            request,
            "run.html",
            visitor,
            row=row,
            series=[(name, SERIES_TITLES[name]) for name in SERIES],
            checkpoints=self._queries.checkpoints(model_id),
            samplers=self._queries.samplers(model_id),
        )

    async def _metrics(self, request: web.Request, visitor: Visitor) -> web.StreamResponse:
        row = self._queries.run(visitor, request.match_info["model_id"])
        if row is None:
            return web.json_response({"error": "no such training run"}, status=404)
        body = {"status": row.status, "steps": row.run.steps, **self._queries.metrics(row.run.model_id)}
        return web.json_response(body, headers={"Cache-Control": "no-store"})

    async def _download(self, request: web.Request, visitor: Visitor) -> web.StreamResponse:
        model_id, name = request.match_info["model_id"], request.match_info["name"]
        directory = self._queries.checkpoint_directory(visitor, model_id, request.match_info["segment"], name)
        if directory is None:
            return self._not_found(request, visitor)
        response = web.StreamResponse(
            headers={
                "Content-Type": "application/x-tar",
                # Both names are safe names (letters, digits, '._-'): nothing to quote.
                "Content-Disposition": f'attachment; filename="{model_id}-{name}.tar"',
            }
        )
        with tempfile.TemporaryFile() as archive:
            response.content_length = await asyncio.to_thread(write_tar, directory, archive)
            archive.seek(0)
            await response.prepare(request)
            while chunk := await asyncio.to_thread(archive.read, DOWNLOAD_CHUNK_BYTES):
                await response.write(chunk)
        await response.write_eof()
        return response

    async def _server_page(self, request: web.Request, visitor: Visitor) -> web.StreamResponse:
        if not visitor.admin:
            message = "The server page is for the owners named with --admin-owner."
            return self._render(request, "message.html", visitor, status=403, title="Admins only", message=message)
        return self._render(request, "server.html", visitor, server=self._queries.server())

    def _not_found(self, request: web.Request, visitor: Visitor) -> web.Response:
        message = "No such training run or checkpoint (or it is not yours)."
        return self._render(request, "message.html", visitor, status=404, title="Not found", message=message)

    def _render(
        self, request: web.Request, template: str, visitor: Visitor | None, status: int = 200, **context: Any
    ) -> web.Response:
        page = self._templates.get_template(template)
        html = page.render(visitor=visitor, open=self._sessions.open, path=request.path, **context)
        return web.Response(text=html, status=status, content_type="text/html")


@web.middleware
async def _security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    response = await handler(request)
    if not response.prepared:  # a download already sent its headers
        response.headers.update(SECURITY_HEADERS)
    return response


def _local_path(text: str | None) -> str:
    """Where to go after signing in: a path on this console only, never another site."""
    if not text or not text.startswith("/") or text.startswith("//") or "\\" in text:
        return "/runs"
    return text


def _lora(spec: LoraSpec) -> str:
    modules = [
        name
        for name, on in (("attention", spec.train_attn), ("MLP", spec.train_mlp), ("unembedding", spec.train_unembed))
        if on
    ]
    return f"rank {spec.rank}, alpha {spec.alpha:g}, seed {spec.seed}; {', '.join(modules) or 'no modules'}"


def _when(timestamp: float | None) -> str:
    return "" if timestamp is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))


def _size(count: float) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    unit = 0
    while count >= 1024 and unit < len(units) - 1:
        count, unit = count / 1024, unit + 1
    return f"{count:.0f} B" if unit == 0 else f"{count:.1f} {units[unit]}"


def _expiry(expires_at: float | None) -> str:
    """A checkpoint's time to live, as a person reads it."""
    if expires_at is None:
        return "kept"
    left = expires_at - time.time()
    if left <= 0:
        return "expiring"
    hours, minutes = divmod(int(left) // 60, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {int(left) % 60:02d}s"

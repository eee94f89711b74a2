"""The SDK's connection: a background event loop that owns the gRPC channel and the one
Session stream multiplexing every request of a ServiceClient.

The sync API is a thin layer over this: callers hand requests to the loop thread in
call order (so their order on the stream is the order of the calls) and get back
concurrent futures for the ack and the result.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import ipaddress
import itertools
import logging
import os
import threading
import uuid
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlparse

import grpc

from tinker_client._tokenizer import tokenizer_from_files
from tinker_client.errors import APIConnectionError, APIError, error_for_status, error_from_rpc
from tinker_client.futures import sdk_loop_threads
from tinker_rpc.v1 import runs_pb2_grpc, service_pb2, service_pb2_grpc
from tinker_wire.batches import BATCH_BYTES, take_queued

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase  # imported when a tokenizer is asked for

T = TypeVar("T")
DEFAULT_BASE_URL = "localhost:50051"
MAX_MESSAGE_BYTES = 256 << 20
BATCHES_METADATA = ("tinker-session-batches", "1")
"""Asks the server to answer in batches too."""
BATCH_ID_PREFIX = "batch-"
"""Of a batch message's own request_id, which only a server that does not know batches answers under."""
log = logging.getLogger(__name__)
# Stream statuses that a broken connection produces (our server reports request errors in
# Results, never as the stream's status); resends are idempotent, so retrying is safe.
_TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.ABORTED,
}


class _LoopThread:
    """One daemon thread running an event loop, shared by every client of the process.

    At interpreter exit it cancels what still runs on the loop and closes the channels, so a
    script that never closed its clients exits at once and quietly. A forked child gets a
    loop of its own (the parent's thread does not exist there).
    """

    _instance: _LoopThread | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self.connections: weakref.WeakSet[Connection] = weakref.WeakSet()
        self.shared_connections: dict[ConnectionSettings, Connection] = {}
        self._thread = threading.Thread(target=self.loop.run_forever, name="tinker-client-loop", daemon=True)
        self._thread.start()
        sdk_loop_threads.add(self._thread.ident)
        atexit.register(self.shutdown)

    @classmethod
    def get(cls) -> _LoopThread:
        with cls._lock:
            if cls._instance is None or cls._instance.pid != os.getpid():
                cls._instance = cls()
            return cls._instance

    def shutdown(self, timeout: float = 2.0) -> None:
        if self.pid != os.getpid() or self.loop.is_closed():
            return

        async def cancel_everything() -> None:
            # Tasks first (streams, requests' readers, reconnects), then the channels.
            tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.gather(
                *(connection.aclose() for connection in list(self.connections)), return_exceptions=True
            )
            await self.loop.shutdown_asyncgens()

        try:
            asyncio.run_coroutine_threadsafe(cancel_everything(), self.loop).result(timeout)
        except Exception as error:  # exiting anyway; say why the clean-up was cut short
            log.debug("client shutdown: %r", error)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.loop.close()


def parse_target(base_url: str) -> tuple[str, bool]:
    """'host:port', 'grpc://host:port', 'http://...' → ('host:port', plaintext);
    'grpcs://host:port' or 'https://...' → ('host:port', TLS)."""
    if "://" not in base_url:
        return base_url, False
    parsed = urlparse(base_url)
    if not parsed.hostname:
        raise ValueError(f"base_url {base_url!r}: no host")
    host = f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname
    return f"{host}:{parsed.port or 50051}", parsed.scheme in ("grpcs", "https")


def _is_loopback(target: str) -> bool:
    host = target.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


class BatchesRefused(Exception):
    """A server answered a batch as one request it could not read: one from before batches,
    reached through a load balancer that took the capabilities call to a newer one."""


@dataclass
class Pending:
    """A request until its result: sent (again, after a reconnect) until it is answered."""

    request: service_pb2.SessionRequest
    ack: concurrent.futures.Future[service_pb2.Ack] = field(default_factory=concurrent.futures.Future)
    result: concurrent.futures.Future[service_pb2.Result] = field(default_factory=concurrent.futures.Future)

    def fail(self, error: BaseException) -> None:
        for future in (self.ack, self.result):
            if not future.done():
                future.set_exception(error)

    def on_the_wire(self) -> service_pb2.SessionRequest:
        """What to send on a (new) stream: the request, or once acked, a resume by future_id."""
        if not self.ack.done() or self.ack.exception() is not None:
            return self.request
        resume = service_pb2.ResumeRequest(future_id=self.ack.result().future_id)
        return service_pb2.SessionRequest(request_id=self.request.request_id, resume=resume)


@dataclass(frozen=True)
class ConnectionSettings:
    """Where and how to connect: what a SamplingClient carries to another process."""

    base_url: str
    api_key: str | None = None
    tls_root_certificates: bytes | None = None
    reconnect_timeout: float = 60.0
    extra_metadata: tuple[tuple[str, str], ...] = ()

    @classmethod
    def resolve(
        cls,
        base_url: str | None,
        api_key: str | None,
        tls_root_certificates: bytes | None = None,
        reconnect_timeout: float = 60.0,
        headers: Mapping[str, str] | None = None,
    ) -> ConnectionSettings:
        """Explicit arguments first, then TINKER_BASE_URL / TINKER_API_KEY, then localhost."""
        return cls(
            base_url or os.environ.get("TINKER_BASE_URL") or DEFAULT_BASE_URL,
            api_key or os.environ.get("TINKER_API_KEY"),
            tls_root_certificates,
            reconnect_timeout,
            tuple((key.lower(), value) for key, value in (headers or {}).items()),
        )

    def connect(self) -> Connection:
        """A connection of this process with these settings, shared by everything that asks."""
        shared = _LoopThread.get().shared_connections
        connection = shared.get(self)
        if connection is None or connection.closed:
            connection = shared[self] = Connection(self)
        return connection


class Connection:
    def __init__(self, settings: ConnectionSettings) -> None:
        self.settings = settings
        self._loop_thread = _LoopThread.get()
        self.loop = self._loop_thread.loop
        self.target, self._tls = parse_target(settings.base_url)
        self._tls = self._tls or settings.tls_root_certificates is not None
        self._root_certificates = settings.tls_root_certificates
        if settings.api_key and not self._tls and not _is_loopback(self.target):
            warnings.warn(
                f"sending the API key in plaintext to {self.target}: anyone on the network path can read it; "
                "serve with --tls-cert/--tls-key and connect to grpcs://host:port",
                stacklevel=3,
            )
        auth = (("authorization", f"Bearer {settings.api_key}"),) if settings.api_key else ()
        self.metadata = auth + settings.extra_metadata
        self._reconnect_timeout = settings.reconnect_timeout
        self._capabilities: concurrent.futures.Future[service_pb2.GetServerCapabilitiesResponse] | None = None
        self._tokenizers: dict[str, PreTrainedTokenizerBase] = {}
        self._request_ids = itertools.count(1)
        # Loop-thread state of the session: every unanswered request in submission order,
        # those not yet sent on the current stream, and how many are out on it.
        self._pending: dict[str, Pending] = {}
        self._backlog: deque[Pending] = deque()
        self._outgoing: asyncio.Queue[service_pb2.SessionRequest | None] | None = None
        self._window = 0
        self._unanswered = 0
        self._stream_task: asyncio.Task[None] | None = None
        self._call: grpc.aio.StreamStreamCall | None = None
        self._closed = False
        self._answered_since_reconnect = False
        self._batches_refused = False
        """A server behind this address refused a batch: from then on, requests go one by one."""
        # What holds requests back before they reach this connection (each training client's
        # sequencer), so that settling waits for those too.
        self.holders: weakref.WeakSet[Any] = weakref.WeakSet()
        self.run(self._open_channel())
        self._loop_thread.connections.add(self)

    async def _open_channel(self) -> None:
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # Reconnect within ~0.1 s of a dropped connection, not gRPC's default ~1 s.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        if self._tls:
            credentials = grpc.ssl_channel_credentials(root_certificates=self._root_certificates)
            self._channel = grpc.aio.secure_channel(self.target, credentials, options=options)
        else:
            self._channel = grpc.aio.insecure_channel(self.target, options=options)
        self.stub = service_pb2_grpc.TinkerServiceStub(self._channel)
        self.runs = runs_pb2_grpc.RunsServiceStub(self._channel)

    # -- running coroutines on the loop ----------------------------------------------

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Runs a coroutine on the loop thread and waits for it (from any other thread)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    async def run_async(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Runs a coroutine on the loop thread, awaited from the caller's own loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, self.loop))

    async def _call_unary(self, call: Callable[..., Any], request: Any) -> Any:
        if self._closed:  # (gRPC's own "Channel is closed" is no SDK error)
            raise APIConnectionError("this client was closed", code=grpc.StatusCode.CANCELLED)
        try:
            return await call(request, metadata=self.metadata)
        except grpc.aio.AioRpcError as error:
            raise error_from_rpc(error) from None

    def unary_future(self, call: Callable[..., Any], request: Any) -> concurrent.futures.Future[Any]:
        """Starts a unary RPC (e.g. `connection.stub.GetInfo`) on the loop thread; gRPC errors
        become SDK errors."""
        return asyncio.run_coroutine_threadsafe(self._call_unary(call, request), self.loop)

    def unary_sync(self, call: Callable[..., Any], request: Any) -> Any:
        return self.unary_future(call, request).result()

    async def unary(self, call: Callable[..., Any], request: Any) -> Any:
        return await asyncio.wrap_future(self.unary_future(call, request))

    def capabilities(self, fresh: bool = False) -> concurrent.futures.Future[service_pb2.GetServerCapabilitiesResponse]:
        """The server's capabilities: its limits, asked for once per connection, or (`fresh`) now,
        with the current state of its adapters."""
        failed = self._capabilities is not None and self._capabilities.done() and self._capabilities.exception()
        if fresh or self._capabilities is None or failed:  # (never wait on it here: this may be the loop thread)
            request = service_pb2.GetServerCapabilitiesRequest()
            self._capabilities = self.unary_future(self.stub.GetServerCapabilities, request)
        return self._capabilities

    def tokenizer(self, base_model: str) -> PreTrainedTokenizerBase:
        """A base model's tokenizer, rebuilt from the files the server sends (no hub download)."""
        if base_model not in self._tokenizers:
            request = service_pb2.GetTokenizerRequest(base_model=base_model)
            response = self.unary_sync(self.stub.GetTokenizer, request)
            self._tokenizers[base_model] = tokenizer_from_files(dict(response.files))
        return self._tokenizers[base_model]

    # -- the session stream ----------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def prepare(self, request: service_pb2.SessionRequest) -> Pending:
        """Gives a request its ids; `enqueue` it (on the loop thread) to send it."""
        request.request_id = f"r{next(self._request_ids)}"
        request.idempotency_key = uuid.uuid4().hex
        return Pending(request)

    def submit(self, requests: Sequence[service_pb2.SessionRequest]) -> list[Pending]:
        """Queues requests on the stream, in call order; thread-safe and non-blocking."""
        pendings = [self.prepare(request) for request in requests]
        self.loop.call_soon_threadsafe(self.enqueue, pendings)
        return pendings

    def enqueue(self, pendings: Sequence[Pending]) -> None:
        """Loop thread: puts prepared requests on the stream, in order."""
        for pending in pendings:
            self._enqueue(pending)

    def _enqueue(self, pending: Pending) -> None:
        if self._closed:
            pending.fail(APIConnectionError("this client was closed", code=grpc.StatusCode.CANCELLED))
            return
        self._pending[pending.request.request_id] = pending
        self._backlog.append(pending)
        if self._stream_task is None or self._stream_task.done():
            self._stream_task = self.loop.create_task(self._keep_session())
        self._pump()

    def _pump(self) -> None:
        """Sends from the backlog while the server's window allows (flow control: a client
        never has more requests in flight than the server accepts; the rest wait here)."""
        while self._outgoing is not None and self._backlog and self._unanswered < self._window:
            pending = self._backlog.popleft()
            if pending.request.request_id in self._pending:
                self._outgoing.put_nowait(pending.on_the_wire())
                self._unanswered += 1

    async def _keep_session(self) -> None:
        """Runs the stream; after a break, reconnects with backoff and resends what is
        unanswered: unacked requests as they were (same request_id and idempotency key,
        so the server never runs one twice), acked ones as resumes by future_id."""
        delay, deadline = 0.05, None
        while self._pending and not self._closed:
            if self._answered_since_reconnect:  # the last reconnect worked: start afresh
                delay, deadline, self._answered_since_reconnect = 0.05, None, False
            try:
                await self._run_stream()
                error: APIError = APIConnectionError("the server closed the session", code=grpc.StatusCode.UNAVAILABLE)
            except grpc.aio.AioRpcError as rpc_error:
                error = error_from_rpc(rpc_error)
            except BatchesRefused as refused:  # nothing in the batch ran: resent one by one, in order
                self._batches_refused = True
                message = f"a server at {self.target} refused a batch of requests ({refused}): sending one by one"
                error = APIConnectionError(message, code=grpc.StatusCode.UNAVAILABLE)
            self._outgoing, self._unanswered = None, 0
            if not self._pending:  # an idle stream ended: the next request opens a new one
                return
            if error.code not in _TRANSIENT or self._closed:
                break
            deadline = deadline or self.loop.time() + self._reconnect_timeout
            if self.loop.time() + delay > deadline:
                break
            log.warning("session stream broke (%s); reconnecting in %.2fs", error.message, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
            self._backlog = deque(self._pending.values())  # insertion order: submission order
        else:
            return
        for pending in self._pending.values():
            pending.fail(error)
        self._pending.clear()
        self._backlog.clear()

    async def _run_stream(self) -> None:
        capabilities = await self.stub.GetServerCapabilities(
            service_pb2.GetServerCapabilitiesRequest(), metadata=self.metadata, timeout=30
        )
        self._window = capabilities.max_inflight_requests or 64
        outgoing: asyncio.Queue[service_pb2.SessionRequest | None] = asyncio.Queue()
        # Where the server takes batches, what is queued goes together.
        batches = capabilities.session_batches and not self._batches_refused
        budget = min(BATCH_BYTES, capabilities.max_message_bytes or BATCH_BYTES)

        first_batch: set[str] = set()  # the request ids of the stream's first batch
        batches_read = asyncio.Event()  # the server answered one of them: it reads batches
        stream_over = False

        async def requests():
            held_back: list[service_pb2.SessionRequest | None] = []  # what did not fit the last batch
            while (request := held_back.pop() if held_back else await outgoing.get()) is not None:
                if not batches or len(together := take_queued(request, outgoing, budget, held_back)) == 1:
                    yield request
                    continue
                batch = service_pb2.SessionRequests(requests=together)
                yield service_pb2.SessionRequest(request_id=BATCH_ID_PREFIX + request.request_id, batch=batch)
                if not first_batch:
                    first_batch.update(queued.request_id for queued in together)
                    # Nothing more until the server shows it reads batches (a round trip, once a
                    # stream): one that does not would run what follows before the batch, resent.
                    await batches_read.wait()
                    if stream_over:
                        return

        metadata = (*self.metadata, BATCHES_METADATA) if batches else self.metadata
        self._call = call = self.stub.Session(requests(), metadata=metadata)
        self._outgoing = outgoing
        try:
            self._pump()
            async for message in call:
                responses = message.batch.responses if message.WhichOneof("response") == "batch" else (message,)
                for response in responses:
                    if response.request_id in first_batch:
                        batches_read.set()
                    self._dispatch(response)
        except BatchesRefused:
            call.cancel()  # (nothing more goes out on it)
            raise
        finally:
            stream_over = True
            batches_read.set()
            outgoing.put_nowait(None)  # gRPC's reader of this stream's requests ends with it

    def _dispatch(self, response: service_pb2.SessionResponse) -> None:
        if response.request_id.startswith(BATCH_ID_PREFIX):
            raise BatchesRefused(response.result.error.message)
        pending = self._pending.get(response.request_id)
        if pending is None:
            return
        if response.HasField("ack"):
            if not pending.ack.done():
                pending.ack.set_result(response.ack)
            return
        del self._pending[response.request_id]
        self._unanswered -= 1
        self._answered_since_reconnect = True
        result = response.result
        if result.HasField("error"):
            acked = pending.ack.done() or bool(result.future_id)
            pending.fail(error_for_status(result.error.code, result.error.message, response.request_id, acked=acked))
        else:
            if not pending.ack.done():  # a resumed request's ack came on an earlier stream
                pending.ack.set_result(service_pb2.Ack(future_id=result.future_id))
            pending.result.set_result(result)
        self._pump()

    async def settle(self) -> None:
        """Loop thread: waits until every request made so far is answered or has failed, those
        still held back by a client (a custom loss's backward, what waits behind it) included."""
        while self._pending or any(holder.holding for holder in self.holders):
            results = [asyncio.wrap_future(pending.result) for pending in self._pending.values()]
            await asyncio.gather(*results, return_exceptions=True)
            await asyncio.sleep(0.005)  # a held request is released by a callback, not awaitable here

    async def aclose(self) -> None:
        """Ends the stream (requests still unanswered fail) and closes the channel."""
        if self._closed:
            return
        self._closed = True
        if self._outgoing is not None:
            self._outgoing.put_nowait(None)  # ends the request stream: a clean half-close
        if self._call is not None:
            self._call.cancel()
        if self._stream_task is not None:
            self._stream_task.cancel()
            await asyncio.gather(self._stream_task, return_exceptions=True)
        for pending in self._pending.values():
            pending.fail(APIConnectionError("this client was closed", code=grpc.StatusCode.CANCELLED))
        self._pending.clear()
        await self._channel.close()

    def close(self) -> None:
        if not self.loop.is_closed():
            self.run(self.aclose())

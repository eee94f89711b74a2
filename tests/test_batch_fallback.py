"""A client and a server from before session batches, behind one address: a load balancer that
took the capabilities call to a newer server sends the stream to an older one, which reads a batch
as a request with no operation and answers under the batch's own id. The SDK then sends the
batch's requests again one by one, in order, each once; nothing hangs."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from tinker_client._connection import ConnectionSettings
from tinker_rpc.v1 import service_pb2, service_pb2_grpc, training_pb2


class ServerBeforeBatches(service_pb2_grpc.TinkerServiceServicer):
    """Says it takes batches (a newer server's answer), and answers as an older one: each request
    alone with an ack and a result, a batch with an error under its id."""

    def __init__(self) -> None:
        self.received: list[str] = []
        self.batches = 0
        self._lock = threading.Lock()

    def GetServerCapabilities(self, request, context) -> service_pb2.GetServerCapabilitiesResponse:
        return service_pb2.GetServerCapabilitiesResponse(session_batches=True, max_inflight_requests=64)

    def Session(self, request_iterator, context) -> Iterator[service_pb2.SessionResponse]:
        for message in request_iterator:
            if message.WhichOneof("request") == "batch":  # a field it does not know: no operation
                self.batches += 1
                time.sleep(0.2)  # (what is sent meanwhile must wait: this server would run it first)
                error = service_pb2.Error(code=3, message="request: no operation set")  # INVALID_ARGUMENT
                yield service_pb2.SessionResponse(request_id=message.request_id, result=service_pb2.Result(error=error))
                continue
            with self._lock:
                self.received.append(message.request_id)
            future_id = f"f-{message.request_id}"
            yield service_pb2.SessionResponse(request_id=message.request_id, ack=service_pb2.Ack(future_id=future_id))
            result = service_pb2.Result(future_id=future_id, optim_step=training_pb2.OptimStepResult())
            yield service_pb2.SessionResponse(request_id=message.request_id, result=result)


@pytest.fixture
def old_server() -> Iterator[tuple[str, ServerBeforeBatches]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = ServerBeforeBatches()
    service_pb2_grpc.add_TinkerServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(grace=None)


def step() -> service_pb2.SessionRequest:
    return service_pb2.SessionRequest(model_id="run", optim_step=training_pb2.OptimStepRequest())


def test_a_batch_a_server_cannot_read_is_sent_again_one_by_one_in_order(old_server):
    address, servicer = old_server
    connection = ConnectionSettings(base_url=address).connect()
    pendings = connection.submit([step() for _ in range(12)])  # queued at once: all but the first go as a batch
    time.sleep(0.05)
    pendings += connection.submit([step()])  # sent before the refusal comes back: it waits for it
    for pending in pendings:
        assert pending.result.result(timeout=30).future_id == f"f-{pending.request.request_id}"
    assert servicer.batches == 1
    assert servicer.received == [pending.request.request_id for pending in pendings]  # each once, in order
    connection.close()

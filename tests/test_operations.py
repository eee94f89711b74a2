"""What operators rely on: health checking, reflection, and Prometheus metrics."""

from __future__ import annotations

import os
import re
import signal
import threading
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from server_process import running_server, server_command

from tinker_client import APIConnectionError, ServiceClient

from .conftest import BASE_MODEL
from .helpers import ragged_batch

DATA = ragged_batch(seed=100, lengths=[7])


@pytest.fixture(scope="module")
def ops_server(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("ops")
    with running_server(data_dir, ["--metrics-port", "0"]) as address:
        log = (data_dir / "server.log").read_text()
        metrics_port = int(re.search(r"metrics on http://[^:]+:(\d+)/metrics", log).group(1))
        yield address, metrics_port, data_dir


def test_reflection_lists_the_services(ops_server):
    address, _, _ = ops_server
    with grpc.insecure_channel(address) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"tinker_rpc.v1.TinkerService", "tinker_rpc.v1.RunsService", "grpc.health.v1.Health"} <= services


def test_metrics_report_requests_after_they_are_made(ops_server):
    address, metrics_port, _ = ops_server
    service = ServiceClient(base_url=address)
    training = service.create_lora_training_client(BASE_MODEL, rank=4, seed=0).result()
    training.forward_backward(DATA, "cross_entropy").result()
    service.close()
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    served = re.search(r'tinker_requests_total\{operation="ForwardBackward",status="OK"\} (\S+)', text)
    assert served and float(served.group(1)) >= 1
    assert float(re.search(r"^tinker_tokens_total (\S+)$", text, re.M).group(1)) >= 7
    assert float(re.search(r"^tinker_cycle_seconds_count (\S+)$", text, re.M).group(1)) >= 1
    assert "tinker_queue_depth" in text and "tinker_worker_restarts_total" in text


def test_health_goes_not_serving_then_serving_around_a_worker_restart(ops_server):
    address, _, data_dir = ops_server
    statuses: list[int] = []
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        assert stub.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        watch = stub.Watch(health_pb2.HealthCheckRequest(service="tinker_rpc.v1.TinkerService"))

        def collect() -> None:
            try:
                statuses.extend(response.status for response in watch)
            except grpc.RpcError as error:  # cancelled below, once the test has seen enough
                assert error.code() == grpc.StatusCode.CANCELLED, error

        watcher = threading.Thread(target=collect, daemon=True)
        watcher.start()

        pid = int(re.findall(r"worker pid (\d+)", (data_dir / "server.log").read_text())[-1])
        os.kill(pid, signal.SIGKILL)
        service = ServiceClient(base_url=address)
        with pytest.raises(APIConnectionError, match="worker process exited"):  # the cycle that finds it dead
            service.create_lora_training_client(BASE_MODEL, rank=4, seed=1).result()
        fresh = service.create_lora_training_client(BASE_MODEL, rank=4, seed=2).result()
        assert fresh.forward(DATA, "cross_entropy").result(timeout=120).metrics["loss:sum"] > 0
        service.close()
        watch.cancel()
        watcher.join(10)
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert statuses[0] == serving and not_serving in statuses and statuses[-1] == serving


def test_health_is_not_serving_while_the_worker_loads_and_serving_after(tmp_path):
    import subprocess

    command = server_command(tmp_path)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        address = re.search(r"bound on (\S+)", process.stdout.readline()).group(1)
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            first = stub.Check(health_pb2.HealthCheckRequest(service="tinker_rpc.v1.TinkerService")).status
            assert "listening on" in process.stdout.readline()
            after = stub.Check(health_pb2.HealthCheckRequest(service="tinker_rpc.v1.TinkerService")).status
    finally:
        process.terminate()
        process.wait(30)
    assert first == health_pb2.HealthCheckResponse.NOT_SERVING
    assert after == health_pb2.HealthCheckResponse.SERVING

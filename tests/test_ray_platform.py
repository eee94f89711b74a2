"""Replicas as Ray actors on a two-node local cluster (ray.cluster_utils, on 127.0.0.1): runs on
different nodes, per-run order, a move between nodes bit-for-bit, and a node lost with its runs
coming back on the other from their checkpoints. Skipped only where the `ray` extra is absent."""

from __future__ import annotations

import os
from collections.abc import Iterator

import grpc
import pytest
from server_process import start_server, stop_server

from tinker_client import ServiceClient
from tinker_rpc.v1 import admin_pb2, admin_pb2_grpc

from .conftest import BASE_MODEL, Server
from .test_fleet import ADAM, DATA, placements, step

cluster_utils = pytest.importorskip("ray.cluster_utils")
NODE = {"num_cpus": 1, "resources": {"replica": 1}, "node_ip_address": "127.0.0.1", "object_store_memory": 80 << 20}


@pytest.fixture(scope="module")
def cluster() -> Iterator[object]:
    """A head node and one more, each with one replica slot; dashboard and usage stats off."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cluster = cluster_utils.Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
    cluster.second_node = cluster.add_node(**NODE)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


@pytest.fixture(scope="module")
def ray_server(cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data_dir = tmp_path_factory.mktemp("ray-server")
    arguments = ["--platform", "ray", "--ray-address", cluster.address, "--replicas", "2"]
    arguments += ["--ray-cpus-per-replica", "1", "--ray-resources-per-replica", '{"replica": 1}']
    process, address = start_server(data_dir, arguments)
    try:
        yield Server(address, data_dir)
    finally:
        stop_server(process)
    # SIGTERM stops it as it stops any server, saving live runs (ray.init takes SIGTERM over; the
    # platform gives it back): before, it died mid-loop with an abort, its live runs unsaved.
    log = (data_dir / "server.log").read_text()
    assert process.returncode == 0 and "server stopped" in log, log[-3000:]


@pytest.fixture(scope="module")
def admin(ray_server: Server) -> Iterator[admin_pb2_grpc.AdminServiceStub]:
    with grpc.insecure_channel(ray_server.address) as channel:
        yield admin_pb2_grpc.AdminServiceStub(channel)


@pytest.fixture(scope="module")
def service(ray_server: Server) -> Iterator[ServiceClient]:
    client = ServiceClient(base_url=ray_server.address)
    yield client
    client.close()


def locations(admin: admin_pb2_grpc.AdminServiceStub) -> dict[str, str]:
    replicas = admin.ListReplicas(admin_pb2.ListReplicasRequest()).replicas
    return {replica.replica_id: replica.location for replica in replicas}


def test_runs_land_on_actors_on_different_nodes_and_keep_their_order(service, admin, cluster):
    where = locations(admin)
    assert len(where) == 2 and all(location.startswith("ray node") for location in where.values())
    assert any(cluster.second_node.node_id in location for location in where.values())
    first, second = (service.create_lora_training_client(BASE_MODEL, rank=4, seed=3).result() for _ in range(2))
    placed = placements(admin)
    assert placed[first.model_id] != placed[second.model_id]

    pending = {run.model_id: [] for run in (first, second)}
    for _ in range(2):
        for run in (first, second):  # interleaved, every request sent before any result is read
            pending[run.model_id].append(run.forward_backward(DATA, "cross_entropy"))
            run.optim_step(ADAM)
    losses = [[future.result().metrics["loss:sum"] for future in futures] for futures in pending.values()]
    assert losses[0] == losses[1] and losses[0][1] < losses[0][0]

    moved = admin.MigrateRun(admin_pb2.MigrateRunRequest(model_id=first.model_id))
    assert moved.replica_id == placed[second.model_id]
    assert step(first) == step(second)  # the moved run goes on exactly as the one that stayed


def test_a_lost_node_s_runs_come_back_from_their_checkpoints_on_the_other(service, admin, cluster):
    admin.Rebalance(admin_pb2.RebalanceRequest(base_model=BASE_MODEL))  # the last test moved a run
    runs = [service.create_lora_training_client(BASE_MODEL, rank=4, seed=9).result() for _ in range(2)]
    assert placements(admin)[runs[0].model_id] != placements(admin)[runs[1].model_id]
    step(runs[0]), step(runs[1])
    checkpoints = [run.save_state("before-loss").result().path for run in runs]
    after_checkpoint = [step(run) for run in runs]  # lost with the node, for the run that was there
    node = cluster.second_node.node_id
    replica_there = next(replica for replica, location in locations(admin).items() if node in location)
    lost = next(run for run in runs if placements(admin)[run.model_id] == replica_there)
    kept = runs[1 - runs.index(lost)]

    cluster.remove_node(cluster.second_node)
    with pytest.raises(Exception) as error:
        lost.forward_backward(DATA, "cross_entropy").result(timeout=60)
    message = str(error.value)
    assert f"replica {replica_there} was lost" in message and checkpoints[runs.index(lost)] in message, message
    assert "load_state" in message

    survivor = next(replica for replica in locations(admin) if replica != replica_there)
    assert placements(admin)[lost.model_id] == placements(admin)[kept.model_id] == survivor
    lost.load_state(checkpoints[runs.index(lost)]).result()
    resumed = lost.forward_backward(DATA, "cross_entropy").result().metrics["loss:sum"]
    assert resumed == after_checkpoint[runs.index(lost)]
    assert step(kept) < after_checkpoint[runs.index(kept)]  # the run on the surviving node never noticed

"""Several replicas and base models behind one server (local platform): placement, per-run
order across replicas, migration bit-for-bit, drain, add-replica and rebalance."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import grpc
import pytest
import torch
from safetensors.torch import load_file
from server_process import running_server

from tinker_client import ServiceClient, TrainingClient, types
from tinker_rpc.v1 import admin_pb2, admin_pb2_grpc

from .architectures import save_model
from .conftest import BASE_MODEL, Server
from .helpers import ragged_batch

QWEN = "tiny/qwen3"
DATA = ragged_batch(seed=17, lengths=[9, 5])
ADAM = types.AdamParams(learning_rate=1e-2)
GREEDY = types.SamplingParams(max_tokens=6, temperature=0.0, stop=[])
PROMPT = types.ModelInput.from_ints([256, 72, 105])


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Two replicas of the embedded model and one of a saved Qwen3 directory, from a models file."""
    data_dir = tmp_path_factory.mktemp("fleet")
    qwen = save_model("qwen3", data_dir / "qwen3-model")
    models = data_dir / "models.toml"
    models.write_text(f'[[model]]\nreplicas = 2\n\n[[model]]\npath = "{qwen}"\nname = "{QWEN}"\n')
    with running_server(data_dir / "server", ["--models-file", str(models)]) as address:
        yield Server(address, data_dir / "server")


@pytest.fixture(scope="module")
def admin(fleet: Server) -> Iterator[admin_pb2_grpc.AdminServiceStub]:
    with grpc.insecure_channel(fleet.address) as channel:
        yield admin_pb2_grpc.AdminServiceStub(channel)


@pytest.fixture(scope="module")
def service(fleet: Server) -> Iterator[ServiceClient]:
    client = ServiceClient(base_url=fleet.address)
    yield client
    client.close()


def placements(admin: admin_pb2_grpc.AdminServiceStub) -> dict[str, str]:
    """model_id -> replica_id."""
    replicas = admin.ListReplicas(admin_pb2.ListReplicasRequest()).replicas
    return {model_id: replica.replica_id for replica in replicas for model_id in replica.model_ids}


def step(training: TrainingClient) -> float:
    loss = training.forward_backward(DATA, "cross_entropy").result().metrics["loss:sum"]
    training.optim_step(ADAM).result()
    return loss


def test_runs_spread_over_replicas_and_each_keeps_its_order(service, admin):
    first, second = (service.create_lora_training_client(BASE_MODEL, rank=4, seed=3).result() for _ in range(2))
    where = placements(admin)
    assert {where[first.model_id], where[second.model_id]} == {f"{BASE_MODEL}/0", f"{BASE_MODEL}/1"}

    # Every request of both runs is sent before any result is read: each replica runs its own.
    pending = {run.model_id: [] for run in (first, second)}
    for _ in range(3):
        for run in (first, second):
            pending[run.model_id].append(run.forward_backward(DATA, "cross_entropy"))
            run.optim_step(ADAM)
    losses = {model_id: [f.result().metrics["loss:sum"] for f in futures] for model_id, futures in pending.items()}

    reference = service.create_lora_training_client(BASE_MODEL, rank=4, seed=3).result()
    expected = [step(reference) for _ in range(3)]  # one request at a time
    assert losses[first.model_id] == losses[second.model_id] == expected
    assert expected[2] < expected[0]


def test_a_migrated_run_continues_bit_for_bit(service, admin, fleet):
    def train(move: bool) -> tuple[list[float], list[int], dict[str, torch.Tensor]]:
        training = service.create_lora_training_client(BASE_MODEL, rank=4, seed=11).result()
        losses = [step(training)]
        sampler = training.save_weights_and_get_sampling_client().result()  # its files are written in the background
        training.forward_backward(DATA, "cross_entropy").result()  # gradients no step consumed yet
        if move:
            before = placements(admin)[training.model_id]
            moved = admin.MigrateRun(admin_pb2.MigrateRunRequest(model_id=training.model_id))
            assert moved.replica_id != before and moved.epoch == 2
            assert placements(admin)[training.model_id] == moved.replica_id
        training.optim_step(ADAM).result()
        losses += [step(training), step(training)]
        tokens = list(sampler.sample(PROMPT, 1, GREEDY).result().sequences[0].tokens)
        path = training.save_state("end").result().path
        directory = fleet.data_dir / "runs" / training.model_id / "weights" / "end"
        assert path.endswith("/weights/end") and directory.is_dir()
        tensors = load_file(directory / "adapter_model.safetensors") | load_file(directory / "optimizer.safetensors")
        return losses, tokens, tensors

    moved_losses, moved_tokens, moved_state = train(move=True)
    losses, tokens, state = train(move=False)
    assert moved_losses == losses and moved_tokens == tokens
    assert moved_state.keys() == state.keys()
    assert all(torch.equal(moved_state[key], state[key]) for key in state)


def test_several_base_models_behind_one_server(service, admin, fleet):
    capabilities = service.get_server_capabilities()
    assert {model.model_name for model in capabilities.supported_models} == {BASE_MODEL, QWEN}
    qwen = service.create_lora_training_client(QWEN, rank=4, seed=2).result()
    assert placements(admin)[qwen.model_id] == f"{QWEN}/0"
    assert qwen.get_info().model_data.model_name == QWEN
    losses = [step(qwen) for _ in range(3)]
    assert losses[2] < losses[0]

    listing = subprocess.run(
        [sys.executable, "-m", "tinker_server", "admin", "--address", fleet.address, "list"],
        capture_output=True,
        text=True,
        check=True,
    )
    replicas = json.loads(listing.stdout)["replicas"]
    assert sorted(replica["replica_id"] for replica in replicas) == [f"{BASE_MODEL}/0", f"{BASE_MODEL}/1", f"{QWEN}/0"]
    assert qwen.model_id in next(r for r in replicas if r["base_model"] == QWEN)["model_ids"]


def test_bad_admin_requests_name_the_field(service, admin):
    training = service.create_lora_training_client(BASE_MODEL, rank=4, seed=1).result()
    with pytest.raises(grpc.RpcError) as error:
        admin.MigrateRun(admin_pb2.MigrateRunRequest(model_id=training.model_id, replica_id=f"{QWEN}/0"))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND and "replica_id" in error.value.details()
    with pytest.raises(grpc.RpcError) as error:
        admin.MigrateRun(admin_pb2.MigrateRunRequest(model_id="no-such-run"))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "model_id" in error.value.details()
    with pytest.raises(grpc.RpcError) as error:
        admin.DrainReplica(admin_pb2.DrainReplicaRequest(replica_id=f"{QWEN}/0"))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "last replica" in error.value.details()
    step(training)  # the run never noticed


def test_drain_then_add_a_replica_and_rebalance(service, admin):
    runs = [service.create_lora_training_client(BASE_MODEL, rank=4, seed=7).result() for _ in range(2)]
    expected = [step(run) for run in runs]
    drained = admin.DrainReplica(admin_pb2.DrainReplicaRequest(replica_id=f"{BASE_MODEL}/1")).model_ids
    where = placements(admin)
    assert drained and all(where[model_id] == f"{BASE_MODEL}/0" for model_id in drained)
    assert f"{BASE_MODEL}/1" not in {r.replica_id for r in admin.ListReplicas(admin_pb2.ListReplicasRequest()).replicas}

    added = admin.AddReplica(admin_pb2.AddReplicaRequest(base_model=BASE_MODEL)).replica
    assert added.replica_id == f"{BASE_MODEL}/1" and not added.model_ids
    moved = admin.Rebalance(admin_pb2.RebalanceRequest(base_model=BASE_MODEL)).model_ids
    replicas = admin.ListReplicas(admin_pb2.ListReplicasRequest()).replicas
    loads = [len(replica.model_ids) for replica in replicas if replica.base_model == BASE_MODEL]
    assert moved and max(loads) - min(loads) <= 1
    # Seeded alike and trained alike, they stay equal however they moved.
    after = [step(run) for run in runs]
    assert expected[0] == expected[1] and after[0] == after[1] < expected[0]

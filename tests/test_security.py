"""API keys isolate owners; a flood meets RESOURCE_EXHAUSTED while others go on; TLS works."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import grpc
import numpy as np
import pytest
from server_process import running_server

from tinker_client import AuthenticationError, NotFoundError, RateLimitError, ServiceClient, types
from tinker_client._convert import forward_backward_input
from tinker_rpc.v1 import admin_pb2, admin_pb2_grpc, service_pb2, service_pb2_grpc, training_pb2
from tinker_wire.tensor_codec import decode_array

from .conftest import BASE_MODEL
from .helpers import RawSession, create_run, provenance_datum, ragged_batch, record_sample

DATA = ragged_batch(seed=60, lengths=[6])


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("keyed")
    keys = data_dir / "keys.txt"
    keys.write_text("# key owner\nalice-key alice\nbob-key bob\n")
    arguments = ["--api-keys-file", str(keys), "--max-inflight-requests", "8", "--admin-owner", "alice"]
    with running_server(data_dir, arguments) as address:
        yield address


def session(address: str, key: str | None) -> tuple[grpc.Channel, object]:
    channel = grpc.insecure_channel(address)
    metadata = (("authorization", f"Bearer {key}"),) if key else ()
    return channel, (service_pb2_grpc.TinkerServiceStub(channel), metadata)


def test_another_key_cannot_see_or_touch_a_runs_state(keyed_server, tmp_path):
    alice = ServiceClient(base_url=keyed_server, api_key="alice-key")
    bob = ServiceClient(base_url=keyed_server, api_key="bob-key")
    training = alice.create_lora_training_client(BASE_MODEL, rank=4, seed=1).result()
    state = training.save_state("mine").result().path
    sampler = training.save_weights_and_get_sampling_client("mine").result()
    alice_rest, bob_rest = alice.create_rest_client(), bob.create_rest_client()
    assert training.model_id in [run.training_run_id for run in alice_rest.list_training_runs().result().training_runs]

    assert training.model_id not in [
        run.training_run_id for run in bob_rest.list_training_runs().result().training_runs
    ]
    for attempt in (
        lambda: bob_rest.get_training_run(training.model_id).result(),
        lambda: bob_rest.list_checkpoints(training.model_id).result(),
        lambda: bob_rest.delete_checkpoint_from_tinker_path(state).result(),
        lambda: bob_rest.download_checkpoint_archive_from_tinker_path(state, tmp_path / "stolen.tar").result(),
        lambda: bob.create_training_client_from_state(state).result(),
        lambda: (
            bob.create_sampling_client(model_path=sampler.model_path)
            .result()
            .sample(types.ModelInput.from_ints([1, 2]), 1, types.SamplingParams(max_tokens=2))
            .result(timeout=30)
        ),
    ):
        with pytest.raises(NotFoundError):
            attempt()
    assert not (tmp_path / "stolen.tar").exists()

    # Through the raw protocol too: Bob names Alice's model_id and Alice's future.
    channel, (stub, metadata) = session(keyed_server, "bob-key")
    responses = stub.Session(
        iter(
            [
                service_pb2.SessionRequest(
                    request_id="x",
                    model_id=training.model_id,
                    forward=forward_backward_input(DATA, "cross_entropy", None),
                )
            ]
        ),
        metadata=metadata,
    )
    assert next(responses).result.error.code == grpc.StatusCode.NOT_FOUND.value[0]
    with pytest.raises(NotFoundError):
        bob.create_rest_client().get_training_run_by_tinker_path(state).result()
    channel.close()

    # Alice's things are intact.
    assert [c.tinker_path for c in alice_rest.list_checkpoints(training.model_id).result().checkpoints] == [
        state,
        sampler.model_path,
    ]
    alice.close()
    bob.close()


def test_another_key_cannot_name_a_recorded_sequence(keyed_server):
    """Sampled sequences are recorded per owner: Bob's span naming Alice's sequence is as unknown."""
    prompt = [256, 72, 105]
    alice, bob = RawSession(keyed_server, "alice-key"), RawSession(keyed_server, "bob-key")
    try:
        sequence = record_sample(alice, prompt, num_samples=1, seed=3).sequences[0]
        advantages = np.ones(len(prompt) + len(decode_array(sequence.tokens)) - 1, np.float32)
        datum = provenance_datum(prompt, sequence, advantages=advantages)
        request = training_pb2.ForwardBackwardInput(loss_fn="stable_reinforce", data=[datum])
        assert not alice.call(model_id=create_run(alice), forward=request).HasField("error")
        refused = bob.call(model_id=create_run(bob), forward=request).error
    finally:
        alice.close()
        bob.close()
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert f"data[0].model_input_spans[0].sequence_id: no recorded sequence {sequence.sequence_id!r}" in refused.message


def test_only_admin_owners_operate_the_replicas(keyed_server):
    with grpc.insecure_channel(keyed_server) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            admin.ListReplicas(admin_pb2.ListReplicasRequest(), metadata=(("authorization", "Bearer bob-key"),))
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED and "--admin-owner" in refused.value.details()
        listed = admin.ListReplicas(admin_pb2.ListReplicasRequest(), metadata=(("authorization", "Bearer alice-key"),))
        assert [replica.replica_id for replica in listed.replicas] == [f"{BASE_MODEL}/0"]


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_no_or_unknown_key_is_unauthenticated(keyed_server, key):
    client = ServiceClient(base_url=keyed_server, api_key=key)
    with pytest.raises(AuthenticationError, match="API key"):
        client.get_server_capabilities()
    with pytest.raises(AuthenticationError):
        client.create_lora_training_client(BASE_MODEL, rank=4).result()
    client.close()


def test_a_server_without_keys_refuses_to_start_unless_told_to_run_open(tmp_path):
    command = [sys.executable, "-m", "tinker_server", "--port", "0", "--data-dir", str(tmp_path)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert finished.returncode != 0 and "no API keys configured" in finished.stderr


def test_a_flood_gets_resource_exhausted_while_another_client_completes(keyed_server):
    channel, (stub, metadata) = session(keyed_server, "alice-key")
    alice = ServiceClient(base_url=keyed_server, api_key="alice-key")
    flooder = alice.create_lora_training_client(BASE_MODEL, rank=4, seed=1).result()
    big = ragged_batch(seed=61, lengths=[400] * 4)
    requests = [
        service_pb2.SessionRequest(
            request_id=f"f{i}", model_id=flooder.model_id, forward=forward_backward_input(big, "cross_entropy", None)
        )
        for i in range(40)
    ]
    responses = stub.Session(iter(requests), metadata=metadata)

    bob = ServiceClient(base_url=keyed_server, api_key="bob-key")
    training = bob.create_lora_training_client(BASE_MODEL, rank=4, seed=2).result()
    # More requests than the server's window of 8, all at once: the SDK queues the excess.
    futures = [training.forward(DATA, "cross_entropy") for _ in range(20)]
    losses = [future.result(timeout=120).metrics["loss:sum"] for future in futures]
    assert losses == pytest.approx([losses[0]] * len(losses), rel=1e-5)  # all 20 ran, none was turned away

    codes = [response.result.error.code for response in responses if response.HasField("result")]
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]) >= 40 - 8 - 8  # most were turned away
    assert codes.count(0) >= 8  # the first ones ran
    assert alice.get_server_capabilities().max_inflight_requests == 8
    channel.close()
    alice.close()
    bob.close()


def test_tls_serves_with_a_certificate_and_refuses_plaintext(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    with running_server(tmp_path / "data", ["--tls-cert", str(cert), "--tls-key", str(key)]) as address:
        port = address.rsplit(":", 1)[1]
        secure = ServiceClient(base_url=f"grpcs://localhost:{port}", tls_root_certificates=cert.read_bytes())
        training = secure.create_lora_training_client(BASE_MODEL, rank=4, seed=1).result()
        assert np.isfinite(training.forward(DATA, "cross_entropy").result().metrics["loss:sum"])
        secure.close()
        plaintext = ServiceClient(base_url=f"localhost:{port}", reconnect_timeout=0.5)
        with pytest.raises(Exception, match="UNAVAILABLE|unavailable|closed"):
            plaintext.get_server_capabilities()
        plaintext.close()
    assert Path(cert).exists()


def test_the_run_limit_per_owner_is_enforced_and_the_resident_limit_reported(tmp_path):
    with running_server(tmp_path, ["--max-adapters", "1", "--max-runs-per-owner", "2"]) as address:
        service = ServiceClient(base_url=address)
        assert service.get_server_capabilities().max_adapters == 1
        service.create_lora_training_client(BASE_MODEL, rank=4, seed=1).result()
        service.create_lora_training_client(BASE_MODEL, rank=4, seed=2).result()  # beyond the resident one
        with pytest.raises(RateLimitError, match="you have 2 live training runs, the limit per owner"):
            service.create_lora_training_client(BASE_MODEL, rank=4, seed=3).result()
        service.close()


def test_a_published_checkpoint_is_readable_by_another_key_and_never_writable(keyed_server, tmp_path):
    alice = ServiceClient(base_url=keyed_server, api_key="alice-key")
    bob = ServiceClient(base_url=keyed_server, api_key="bob-key")
    training = alice.create_lora_training_client(BASE_MODEL, rank=4, seed=3).result()
    state = training.save_state("shared").result().path
    alice_rest, bob_rest = alice.create_rest_client(), bob.create_rest_client()
    with pytest.raises(NotFoundError):
        bob.create_training_client_from_state(state).result()
    alice_rest.publish_checkpoint_from_tinker_path(state).result()

    # Readable: loaded into a run of bob's, described, listed as accessible, downloaded, copied.
    expected = training.forward(DATA, "cross_entropy").result().metrics["loss:sum"]
    bobs_run = bob.create_training_client_from_state(state).result()
    assert bobs_run.forward(DATA, "cross_entropy").result().metrics["loss:sum"] == expected
    assert bob_rest.get_weights_info_by_tinker_path(state).result().lora_rank == 4
    accessible = bob_rest.list_training_runs(access_scope="accessible").result().training_runs
    assert training.model_id in [run.training_run_id for run in accessible]
    assert training.model_id not in [
        run.training_run_id for run in bob_rest.list_training_runs().result().training_runs
    ]
    assert bob_rest.download_checkpoint_archive_from_tinker_path(state, tmp_path / "shared.tar").result().stat().st_size
    copy = bob_rest.copy_weights(state).result()
    assert bob_rest.get_training_run_by_tinker_path(copy).result().model_owner == "bob"

    # Never writable: bob cannot unpublish, time out or delete it.
    for attempt in (
        lambda: bob_rest.unpublish_checkpoint_from_tinker_path(state).result(),
        lambda: bob_rest.set_checkpoint_ttl_from_tinker_path(state, 60).result(),
        lambda: bob_rest.delete_checkpoint_from_tinker_path(state).result(),
    ):
        with pytest.raises(NotFoundError):
            attempt()
    assert alice_rest.list_checkpoints(training.model_id).result().checkpoints[0].public
    alice_rest.unpublish_checkpoint_from_tinker_path(state).result()
    with pytest.raises(NotFoundError):
        bob_rest.get_weights_info_by_tinker_path(state).result()


@pytest.mark.parametrize(
    ("base_url", "warned"),
    [("10.1.2.3:50051", True), ("grpc://tinker.example:50051", True), ("grpcs://tinker.example:443", False)]
    + [("127.0.0.1:50051", False), ("localhost:50051", False), ("[::1]:50051", False)],
)
def test_an_api_key_sent_in_plaintext_off_this_machine_is_warned_about(base_url, warned):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        client = ServiceClient(base_url=base_url, api_key="secret")  # no call made: nothing is sent
        client.close()
    messages = [str(warning.message) for warning in caught if "plaintext" in str(warning.message)]
    assert bool(messages) == warned, messages

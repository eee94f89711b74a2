"""Per-owner quotas and queues: one tenant's flood or full disk is refused, naming the quota, and
never holds up another; nothing in a reply reveals another owner's activity."""

from __future__ import annotations

import pytest
from peft import LoraConfig, get_peft_model
from server_process import running_server

from tinker_client import RateLimitError, ServiceClient, _convert, types
from tinker_rpc.v1 import sampling_pb2, service_pb2
from tinker_server.worker.models import build_embedded_model

from .conftest import BASE_MODEL
from .helpers import RawSession, ragged_batch

DATA = ragged_batch(seed=3, lengths=[6])


def test_each_owner_has_its_own_quotas(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("alice-key alice\nbob-key bob\n")
    options = [
        *("--api-keys-file", str(keys), "--cycle", "fixed:0.5"),  # requests wait for the next tick
        *("--max-queued-requests-per-owner", "2", "--max-queued-bytes-per-owner", "100000"),
        *("--max-checkpoint-bytes-per-owner", "1", "--max-stored-results-per-owner", "8"),
        *("--kv-cache-bytes", str(4 << 20)),  # about a thousand positions of the embedded model
    ]
    with running_server(tmp_path, options) as address:
        alice = ServiceClient(base_url=address, api_key="alice-key")
        bob = ServiceClient(base_url=address, api_key="bob-key")
        alices = alice.create_lora_training_client(BASE_MODEL, rank=4, seed=1).result()
        bobs = bob.create_lora_training_client(BASE_MODEL, rank=4, seed=2).result()

        queued = [alices.forward(DATA, "cross_entropy") for _ in range(2)]
        with pytest.raises(RateLimitError, match="2 requests queued, the quota per owner"):
            alices.forward(DATA, "cross_entropy").result(timeout=30)
        assert bobs.forward(DATA, "cross_entropy").result(timeout=30).metrics["loss:sum"] > 0  # bob is not held up
        assert all(future.result(timeout=30).metrics["loss:sum"] > 0 for future in queued)

        big = ragged_batch(seed=4, lengths=[1000] * 16)  # about 200 kB on the wire
        with pytest.raises(RateLimitError, match="--max-queued-bytes-per-owner 100000"):
            alices.forward(big, "cross_entropy").result(timeout=30)

        alices.save_state("first").result(timeout=30)  # under the quota when it was asked for
        with pytest.raises(RateLimitError, match="the quota per owner \\(--max-checkpoint-bytes-per-owner 1\\)"):
            alices.save_state("second").result(timeout=30)
        with pytest.raises(RateLimitError, match="--max-checkpoint-bytes-per-owner"):
            alices.save_weights_and_get_sampling_client().result(timeout=30)
        sampler = bob.create_sampling_client(base_model=BASE_MODEL).result(timeout=30)
        prompt, params = types.ModelInput.from_ints([256, 1, 2, 3]), types.SamplingParams(max_tokens=200)
        with pytest.raises(RateLimitError, match="num_samples=8 .* max_tokens=200 .*--kv-cache-bytes"):
            sampler.sample(prompt, 8, params).result(timeout=30)  # 8 x 204 positions: more than the budget
        assert len(sampler.sample(prompt, 1, params).result(timeout=30).sequences) == 1
        bobs.save_state("first").result(timeout=30)
        for _ in range(3):  # bob's results: his run, a forward, his sampler, two samples, a save, and these
            bobs.forward(DATA, "cross_entropy").result(timeout=30)
        with pytest.raises(RateLimitError, match="8 results kept for resuming, the quota per owner"):
            bobs.forward(DATA, "cross_entropy").result(timeout=30)
        adapter = tmp_path / "adapter"
        get_peft_model(build_embedded_model(), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
        with pytest.raises(RateLimitError, match="--max-checkpoint-bytes-per-owner"):
            alice.create_training_client_from_peft_adapter(adapter).result(timeout=30)
        alice.close()
        bob.close()


def test_owners_sampling_one_base_model_have_their_own_queues_and_seq(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("alice-key alice\nbob-key bob\n")
    sample = sampling_pb2.SampleRequest(
        base_model=BASE_MODEL,
        prompt=_convert.model_input(types.ModelInput.from_ints([256, 72])),
        num_samples=1,
        sampling_params=_convert.sampling_params(types.SamplingParams(max_tokens=2)),
    )
    with running_server(tmp_path, ["--api-keys-file", str(keys)]) as address:
        seqs = {}
        for key in ("alice-key", "alice-key", "bob-key"):
            session = RawSession(address, api_key=key)
            session.send(service_pb2.SessionRequest(request_id="s", sample=sample))
            seqs.setdefault(key, []).append(session.receive().ack.seq)
            session.receive()
            session.close()
    assert seqs == {"alice-key": [1, 2], "bob-key": [1]}  # bob's count knows nothing of alice's

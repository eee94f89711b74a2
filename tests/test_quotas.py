"""Per-owner quotas: one tenant's flood or full disk is refused, naming the quota, and never
holds up another."""

from __future__ import annotations

import pytest
from peft import LoraConfig, get_peft_model
from server_process import running_server

from tinker_client import RateLimitError, ServiceClient
from tinker_server.worker.models import build_embedded_model

from .conftest import BASE_MODEL
from .helpers import ragged_batch

DATA = ragged_batch(seed=3, lengths=[6])


def test_each_owner_has_its_own_quotas(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("alice-key alice\nbob-key bob\n")
    options = [
        *("--api-keys-file", str(keys), "--cycle", "fixed:2"),  # requests wait for the next tick
        *("--max-queued-requests-per-owner", "2", "--max-queued-bytes-per-owner", "100000"),
        *("--max-checkpoint-bytes-per-owner", "1"),
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
        bobs.save_state("first").result(timeout=30)
        adapter = tmp_path / "adapter"
        get_peft_model(build_embedded_model(), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
        with pytest.raises(RateLimitError, match="--max-checkpoint-bytes-per-owner"):
            alice.create_training_client_from_peft_adapter(adapter).result(timeout=30)
        alice.close()
        bob.close()

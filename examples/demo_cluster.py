"""The demo on a two-node local Ray cluster: one server, two base models (the embedded one and a
tiny Qwen3 saved here), one replica each as a Ray actor, the demo's loop on both at once.

Needs the `ray` extra (`make demo-cluster` installs it). The cluster lives on 127.0.0.1, with
its dashboard and usage stats off and one replica slot per node; it is shut down at the end.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo import fine_tune, report  # noqa: E402
from server_process import running_server  # noqa: E402

from tinker_client import ServiceClient  # noqa: E402
from tinker_server.worker.models import byte_tokenizer  # noqa: E402

NODE = {"num_cpus": 1, "resources": {"replica": 1}, "node_ip_address": "127.0.0.1", "object_store_memory": 80 << 20}
QWEN = "demo/tiny-qwen3"


def save_tiny_qwen3(directory: Path) -> Path:
    """A small seeded Qwen3 with the byte tokenizer, saved as a Hugging Face model directory."""
    torch.manual_seed(0)
    config = transformers.Qwen3Config(
        vocab_size=259, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=256, bos_token_id=256, eos_token_id=257,
        pad_token_id=258,
    )  # fmt: skip
    transformers.Qwen3ForCausalLM(config).save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    return directory


def main() -> int:
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
    cluster.add_node(**NODE)
    cluster.wait_for_nodes()
    print(f"two-node Ray cluster up at {cluster.address} ({time.monotonic() - started:.1f}s)")
    try:
        with tempfile.TemporaryDirectory() as data_dir:
            qwen = save_tiny_qwen3(Path(data_dir) / "tiny-qwen3")
            arguments = ["--platform", "ray", "--ray-address", cluster.address, "--ray-cpus-per-replica", "1"]
            arguments += ["--ray-resources-per-replica", '{"replica": 1}', "--base-model", "embedded"]
            arguments += ["--base-model", str(qwen), "--served-model-name", "embedded/tiny-llama"]
            arguments += ["--served-model-name", QWEN]
            with running_server(Path(data_dir) / "server", arguments) as address:
                print(f"server up at {address}, one replica per base model ({time.monotonic() - started:.1f}s)")
                service = ServiceClient(base_url=address)
                models = [model.model_name for model in service.get_server_capabilities().supported_models]
                with ThreadPoolExecutor(len(models)) as pool:  # both loops at once, one per replica
                    outcomes = list(pool.map(fine_tune, [service] * len(models), models, range(len(models))))
                service.close()
    finally:
        cluster.shutdown()
    for outcome in outcomes:
        report(outcome)
    print(f"\ntotal {time.monotonic() - started:.0f}s")
    return 0 if all(outcome.learned for outcome in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())

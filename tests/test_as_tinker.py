"""`python -m tinker_client.as_tinker` runs code written for `tinker` unchanged, in its process and in
the processes it spawns; a SamplingClient pickles into such a process; scripts exit quietly."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

from .conftest import BASE_MODEL

ROOT = Path(__file__).resolve().parents[1]

TINKER_SCRIPT = """
import importlib.metadata
import multiprocessing
import pickle
import sys

import tinker
import tinker_client
from tinker import types
from tinker.lib.public_interfaces import APIFuture
from tinker.lib.public_interfaces.rest_client import RestClient
from tinker.types.tensor_data import TensorData

assert tinker is tinker_client and types is tinker_client.types
assert TensorData is tinker_client.types.TensorData and RestClient is tinker_client.RestClient
assert APIFuture is tinker_client.APIFuture
assert importlib.metadata.version("tinker") == "0.38.0"  # what version checks (the cookbook's scripts) read
PROMPT = types.ModelInput.from_ints([256, 72, 105])
PARAMS = types.SamplingParams(max_tokens=6, seed=11)


def sample_in_child(pickled, queue):
    assert importlib.metadata.version("tinker") == "0.38.0"  # before it imports tinker
    import tinker  # the child runs the alias too

    sampler = pickle.loads(pickled)
    assert isinstance(sampler, tinker.SamplingClient)
    queue.put(sampler.sample(PROMPT, 1, PARAMS).result().sequences[0].tokens)


if __name__ == "__main__":
    service = tinker.ServiceClient(base_url=sys.argv[1])
    training = service.create_lora_training_client("{base_model}", rank=4, seed=2).result()
    sampler = training.save_weights_and_get_sampling_client().result()
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=sample_in_child, args=(pickle.dumps(sampler), queue))
    child.start()
    from_child = queue.get(timeout=120)
    child.join(60)
    assert from_child == sampler.sample(PROMPT, 1, PARAMS).result().sequences[0].tokens, from_child
    handle = tinker.SamplingClient.from_sampler_handle(sampler.get_sampler_handle())
    assert handle.sample(PROMPT, 1, PARAMS).result().sequences[0].tokens == from_child
    try:
        import tinker.lib.internal_client_holder
    except ModuleNotFoundError as error:
        print("refused:", error)
    print("ok", from_child)
""".replace("{base_model}", BASE_MODEL)


def run_script(tmp_path: Path, source: str, *args: str, alias: bool = True) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(source))
    prefix = [sys.executable, "-m", "tinker_client.as_tinker"] if alias else [sys.executable]
    return subprocess.run([*prefix, str(script), *args], capture_output=True, text=True, timeout=300, cwd=tmp_path)


def test_tinker_code_runs_unchanged_and_a_sampling_client_pickles_into_a_spawned_process(server, tmp_path):
    finished = run_script(tmp_path, TINKER_SCRIPT, server.address)
    assert finished.returncode == 0, finished.stderr
    assert "ok [" in finished.stdout
    assert "refused: tinker.lib.internal_client_holder: the tinker SDK's internal module" in finished.stdout
    assert finished.stderr == "", finished.stderr  # nothing printed at exit either


QUIET_EXIT_SCRIPT = """
import sys
import time

sys.path.insert(0, sys.argv[2])
from proxy import CuttableProxy

from tinker_client import ServiceClient, types

proxy = CuttableProxy(sys.argv[1])
service = ServiceClient(base_url=proxy.address)
training = service.create_lora_training_client("{base_model}", rank=4, seed=1).result()
datum = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]), loss_fn_inputs={{"target_tokens": [2, 3, 4]}})
for _ in range(3):
    future = training.forward([datum], "cross_entropy")
    proxy.cut()  # the client reconnects and resumes
    future.result(timeout=60)
sampler = training.save_weights_and_get_sampling_client().result()
pending = training.forward([datum] * 64, "cross_entropy")  # still running when the script ends
print("leaving", time.time(), flush=True)
"""


def test_a_script_that_never_closes_its_clients_exits_at_once_and_quietly(server, tmp_path):
    script = QUIET_EXIT_SCRIPT.format(base_model=BASE_MODEL)
    finished = run_script(tmp_path, script, server.address, str(ROOT / "tests"), alias=False)
    ended = time.time()
    assert finished.returncode == 0, finished.stderr
    left = float(finished.stdout.split()[-1])
    assert ended - left < 5.0
    noise = [
        line
        for line in finished.stderr.splitlines()
        if "reconnecting" not in line  # the SDK's own log of each cut, expected here
    ]
    assert noise == [], finished.stderr

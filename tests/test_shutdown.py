"""SIGTERM: queued requests still run, new ones are refused, every live run is saved, unnamed
snapshots still waiting for their files get them, and the process exits within its bound."""

from __future__ import annotations

import asyncio
import signal
import time

import numpy as np
from server_process import start_server, stop_server

from tinker_client import ServiceClient, TrainingClient, types

from .conftest import BASE_MODEL
from .helpers import ragged_batch

DATA = ragged_batch(seed=80, lengths=[9, 13])
PROMPT = types.ModelInput.from_ints([5, 6, 7, 8])
SEEDED = types.SamplingParams(max_tokens=6, temperature=1.0, seed=3)


def test_sigterm_finishes_queued_work_saves_runs_and_exits(tmp_path):
    process, address = start_server(tmp_path, ["--shutdown-grace", "20"])
    service = ServiceClient(base_url=address, reconnect_timeout=1.0)
    training = service.create_lora_training_client(BASE_MODEL, rank=4, seed=1).result()
    training.forward_backward(DATA, "cross_entropy").result()
    training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    # An unnamed snapshot's files are written seconds after it is made: the stop writes them.
    sampler = training.save_weights_and_get_sampling_client().result()
    sampled = sampler.sample(PROMPT, 1, SEEDED).result().sequences[0]

    async def queue_steps():
        futures = []
        for _ in range(4):
            futures.append(await training.forward_backward_async(DATA, "cross_entropy"))
            futures.append(await training.optim_step_async(types.AdamParams(learning_rate=1e-2)))
        futures.append(await training.forward_async(DATA, "cross_entropy"))
        return futures

    futures = asyncio.run(queue_steps())  # all acked: queued and ordered
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    results = [future.result(timeout=60) for future in futures]
    final_logprobs = results[-1].loss_fn_outputs[0]["logprobs"].to_numpy()
    assert process.wait(timeout=60) == 0
    assert time.monotonic() - started < 30
    service.close()

    process, address = start_server(tmp_path)
    try:
        service = ServiceClient(base_url=address)
        checkpoints = service.create_rest_client().list_checkpoints(training.model_id).result().checkpoints
        autosave = f"tinker://{training.model_id}/weights/autosave-shutdown"
        assert sorted(c.tinker_path for c in checkpoints) == sorted([autosave, sampler.model_path])
        resumed = service.create_training_client_from_state_with_optimizer(autosave).result()
        logprobs = resumed.forward(DATA, "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
        np.testing.assert_array_equal(logprobs, final_logprobs)  # nothing lost
        again = (
            service.create_sampling_client(model_path=sampler.model_path).result().sample(PROMPT, 1, SEEDED).result()
        )
        assert (again.sequences[0].tokens, again.sequences[0].logprobs) == (sampled.tokens, sampled.logprobs)
        same_run = TrainingClient(service._connection, training.get_info())  # and it goes on by its id
        logprobs = same_run.forward(DATA, "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
        np.testing.assert_array_equal(logprobs, final_logprobs)
        same_run.optim_step(types.AdamParams(learning_rate=1e-2)).result()  # its AdamW state came back too
        service.close()
    finally:
        stop_server(process)

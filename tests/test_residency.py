"""RL at scale: unnamed sampler snapshots come and go without growing memory or disk, training
runs are a cache (offloaded and reloaded exactly), in-flight samplers read live weights in
order, and closing a session frees what it trained."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import torch
from server_process import start_server, stop_server

from tinker_client import BadRequestError, RateLimitError, ServiceClient, TrainingClient, types
from tinker_server.cli import parse_args
from tinker_server.worker.main import build_engine
from tinker_server.worker.residency import ResidencyLimits

from .conftest import BASE_MODEL
from .helpers import adapter_tensors, ragged_batch, sampler_dir

DATA = ragged_batch(seed=41, lengths=[12, 7])
ADAM = types.AdamParams(learning_rate=1e-2)
PROMPT = types.ModelInput.from_ints([256, 72, 105])
GREEDY = types.SamplingParams(max_tokens=6, temperature=0.0, stop=[])
SNAPSHOT_BUDGET = 3_000_000  # about four rank-8 snapshots of the embedded model


def worker_rss_bytes(server_pid: int) -> int:
    """Resident memory of the server's worker process: its child that holds the model (the largest)."""
    children = Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text().split()
    return max(_rss(child) for child in children)


def registered_samplers(data_dir: Path, model_id: str) -> int:
    with sqlite3.connect(data_dir / "tinker.db") as db:
        query = "SELECT COUNT(*) FROM samplers WHERE model_path LIKE ?"
        return db.execute(query, (f"tinker://{model_id}/%",)).fetchone()[0]


def _rss(pid: str) -> int:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) * 1024


@pytest.fixture(scope="module")
def cache_server(tmp_path_factory: pytest.TempPathFactory):
    data_dir = tmp_path_factory.mktemp("cache")
    options = [
        "--max-adapters",
        "4",
        "--max-resident-snapshot-bytes",
        str(SNAPSHOT_BUDGET),
        "--max-runs-per-owner",
        "40",
    ]
    process, address = start_server(data_dir, options)
    yield process, address, data_dir
    stop_server(process)


def test_unnamed_saves_in_a_loop_keep_memory_and_disk_bounded(cache_server):
    process, address, data_dir = cache_server
    with ServiceClient(base_url=address) as service:
        training = service.create_lora_training_client(BASE_MODEL, rank=8, seed=1).result()
        rss = {}
        for step in range(500):
            sampler = training.save_weights_and_get_sampling_client().result()
            if step % 50 == 0:
                assert sampler.sample(PROMPT, 1, GREEDY).result().sequences[0].tokens
            del sampler  # its only holder lets go: the snapshot goes once a newer one exists
            if step in (100, 499):
                rss[step] = worker_rss_bytes(process.pid)
        residency = service.get_server_capabilities().residency
        snapshots_dir = data_dir / "runs" / training.model_id / "sampler_weights"
        run_files = list(snapshots_dir.iterdir()) if snapshots_dir.exists() else []
        samplers = registered_samplers(data_dir, training.model_id)
    assert samplers <= 3  # a deleted snapshot's samplers are forgotten with it
    assert residency.device_bytes <= SNAPSHOT_BUDGET + 4 * 4 * 2_000_000  # snapshots within budget, plus runs
    assert residency.resident_snapshots <= 4
    assert len(run_files) <= 1, run_files  # a snapshot replaced within seconds is never written
    assert rss[499] - rss[100] < 40 << 20, rss  # flat: no snapshot kept beyond the budget


def test_pipelined_saves_each_give_a_sampler_that_outlives_newer_saves(cache_server):
    _, address, _ = cache_server
    with ServiceClient(base_url=address) as service:
        training = service.create_lora_training_client(BASE_MODEL, rank=8, seed=3).result()
        futures = []
        for _ in range(4):  # each save is registered with its sampler before the next one lands
            futures.append(training.save_weights_and_get_sampling_client())
            training.forward_backward(DATA, "cross_entropy")
            training.optim_step(types.AdamParams(learning_rate=0.5))
        samplers = [future.result() for future in futures]
        samples = [sampler.sample(PROMPT, 1, GREEDY) for sampler in samplers]
        del samplers, futures  # requests in flight keep their clients' holds until they are answered
        tokens = [sample.result().sequences[0].tokens for sample in samples]
    assert len({tuple(sequence) for sequence in tokens}) > 1  # each read its own weights


def test_twelve_runs_train_round_robin_through_four_resident_adapters_exactly(cache_server):
    _, address, data_dir = cache_server
    with ServiceClient(base_url=address) as service:
        runs = [service.create_lora_training_client(BASE_MODEL, rank=4, seed=seed).result() for seed in range(12)]
        for _ in range(3):  # one run per cycle (as alone below), so only leaving and coming back differs
            for run in runs:
                run.forward_backward(DATA, "cross_entropy").result()  # its gradients wait offloaded
            for run in runs:
                run.optim_step(ADAM).result()
        shared = [run.save_weights_for_sampler("round-robin").result().path for run in runs]
        residency = service.get_server_capabilities().residency
        alone = []
        for seed in range(12):
            run = service.create_lora_training_client(BASE_MODEL, rank=4, seed=seed).result()
            for _ in range(3):
                run.forward_backward(DATA, "cross_entropy").result()
                run.optim_step(ADAM).result()
            alone.append(run.save_weights_for_sampler("alone").result().path)
    assert residency.offloads >= 12 and residency.reloads >= 12
    for shared_path, alone_path in zip(shared, alone, strict=True):
        together, separately = (adapter_tensors(sampler_dir(data_dir, path)) for path in (shared_path, alone_path))
        assert all(torch.equal(together[key], separately[key]) for key in together)  # bit for bit


def test_an_inflight_sampler_reads_the_live_weights_at_its_place_in_the_runs_order(cache_server):
    _, address, _ = cache_server
    with ServiceClient(base_url=address) as service:
        training = service.create_lora_training_client(BASE_MODEL, rank=8, seed=2).result()
        inflight = training.save_weights_and_get_sampling_client(kind="inflight").result()
        assert inflight.model_path == f"tinker://{training.model_id}/inflight"
        training.forward_backward(DATA, "cross_entropy")
        before = inflight.sample(PROMPT, 1, GREEDY)  # queued after the backward, before the step
        training.optim_step(types.AdamParams(learning_rate=0.5))
        after = inflight.sample(PROMPT, 1, GREEDY)  # queued after the step: sees it
        at_the_end = training.save_weights_and_get_sampling_client("end").result()
        assert after.result().sequences[0].tokens == at_the_end.sample(PROMPT, 1, GREEDY).result().sequences[0].tokens
        assert before.result().sequences[0].tokens != after.result().sequences[0].tokens


def test_closing_a_session_frees_its_runs_and_the_owners_run_limit(cache_server):
    _, address, _ = cache_server
    service = ServiceClient(base_url=address)
    runs = [service.create_lora_training_client(BASE_MODEL, rank=4, seed=seed).result() for seed in range(40)]
    with pytest.raises(RateLimitError, match="live training runs, the limit per owner"):
        service.create_lora_training_client(BASE_MODEL, rank=4).result()
    service.close()  # unloads the session's runs
    with ServiceClient(base_url=address) as again:
        closed = TrainingClient(again._connection, runs[0].get_info())  # another client names a closed run
        with pytest.raises(BadRequestError, match="its session was closed"):
            closed.forward(DATA, "cross_entropy").result()
        assert again.create_lora_training_client(BASE_MODEL, rank=4).result().model_id
        assert again.get_server_capabilities().residency.resident_runs <= 4


def test_every_residency_flag_reaches_the_worker_and_the_limits():
    config = parse_args(
        [
            "--allow-unauthenticated",
            *("--max-adapters", "3", "--max-resident-snapshot-bytes", "1000", "--max-host-adapter-bytes", "2000"),
            *("--adapter-idle-seconds", "7", "--ephemeral-ttl-seconds", "9", "--max-runs-per-owner", "5"),
            *("--max-recorded-sequences-per-owner", "11"),
        ]
    )
    limits = build_engine(None, config.worker, torch.device("cpu")).residency.limits
    assert limits == ResidencyLimits(
        max_resident_runs=3, max_resident_snapshot_bytes=1000, max_host_bytes=2000, idle_seconds=7
    )
    assert (config.limits.ephemeral_ttl_seconds, config.limits.max_runs_per_owner) == (9, 5)
    assert config.limits.max_recorded_sequences_per_owner == 11

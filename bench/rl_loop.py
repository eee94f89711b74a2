"""The RL pattern, step after step: forward_backward + optim_step + save_weights_and_get_sampling_client
+ 8 sampled completions, as the tinker-cookbook's rl_loop does.

Reports, after a warm-up, the growth per 100 steps of the worker's memory (RSS) and of the data dir,
the server's own count of resident adapter bytes, and what one unnamed save costs against one
training step (forward_backward + optim_step), both timed in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from server_process import start_server, stop_server  # noqa: E402

from bench.common import ADAM, batch, emit  # noqa: E402
from tinker_client import ServiceClient, types  # noqa: E402

PROMPT = types.ModelInput.from_ints([256, *b"Q: What do bees make?\nA:"])
PARAMS = types.SamplingParams(max_tokens=16, temperature=1.0)


def worker_rss(server_pid: int) -> int:
    """The server's largest child: its worker, which holds the model and the adapters."""
    children = Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text().split()
    return max(_rss(child) for child in children)


def _rss(pid: str) -> int:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) * 1024


def directory_bytes(directory: Path) -> int:
    return sum(file.stat().st_size for file in directory.rglob("*") if file.is_file())


def run(steps: int, warmup: int, rank: int, base_model: str | None) -> dict:
    data = batch(rows=4, length=64, seed=0)
    with tempfile.TemporaryDirectory() as data_dir:
        args = ["--base-model", base_model] if base_model else []
        process, address = start_server(Path(data_dir), args)
        try:
            with ServiceClient(base_url=address) as service:
                training = service.create_lora_training_client(
                    service.get_server_capabilities().supported_models[0].model_name, rank=rank, seed=0
                ).result()
                step_seconds, save_seconds, marks = [], [], {}
                for step in range(warmup + steps):
                    started = time.perf_counter()
                    backward = training.forward_backward(data, "cross_entropy")
                    training.optim_step(ADAM).result()
                    backward.result()
                    trained = time.perf_counter()
                    sampler = training.save_weights_and_get_sampling_client().result()
                    saved = time.perf_counter()
                    sampler.sample(PROMPT, 8, PARAMS).result()
                    del sampler
                    if step >= warmup:
                        step_seconds.append(trained - started)
                        save_seconds.append(saved - trained)
                    if step >= warmup and (step - warmup) % 100 == 0:
                        marks[step - warmup] = (worker_rss(process.pid), directory_bytes(Path(data_dir)))
                residency = service.get_server_capabilities().residency
        finally:
            stop_server(process)
    (first, (rss0, disk0)), (last, (rss1, disk1)) = list(marks.items())[0], list(marks.items())[-1]
    hundreds = max((last - first) / 100, 1e-9)
    result = {
        "steps": steps,
        "rss_mb": round(rss1 / 2**20, 1),
        "rss_growth_pct_per_100_steps": round(100 * (rss1 - rss0) / rss0 / hundreds, 2),
        "data_dir_growth_mb_per_100_steps": round((disk1 - disk0) / 2**20 / hundreds, 2),
        "resident_adapter_mb": round(residency.device_bytes / 2**20, 2),
        "step_ms": round(1e3 * statistics.median(step_seconds), 2),
        "save_ms": round(1e3 * statistics.median(save_seconds), 2),
        "save_over_step": round(statistics.median(save_seconds) / statistics.median(step_seconds), 3),
    }
    return {"benchmark": "rl loop: memory and disk per 100 steps, save cost vs a training step", "results": [result]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", default=None, help="local HF directory (default: the embedded model)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--rank", type=int, default=32)
    args = parser.parse_args(argv)
    report = run(args.steps, args.warmup, args.rank, args.base_model)
    emit(report, list(report["results"][0]))
    return report


if __name__ == "__main__":
    main()

"""The tinker-cookbook 0.6.1's own recipes (sl_loop, rl_loop, math_rl), unmodified, against a real server.

They run under `python -m tinker_client.as_tinker`, so their `import tinker` is this SDK. The
embedded model is served under a hub name the cookbook knows (its renderer is chosen by name), and
the data sets are small ones made here (tests/cookbook/run_recipe.py hands them to `load_dataset`).
sl_loop teaches the model to answer in the rl_loop prompt's format; rl_loop resumes from sl_loop's
final state (through the cookbook's own checkpoints.jsonl) and trains with both of its losses.
sl_loop itself resumes from a LoRA made here with a fixed seed, so every run trains the same way.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import safetensors.torch
import torch
from server_process import running_server

from tinker_client import RestClient, ServiceClient

pytest.importorskip("tinker_cookbook", reason="make test installs the tinker-cookbook")

ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "meta-llama/Llama-3.2-1B"  # the cookbook renders it with its role_colon renderer
SUFFIX = " Provide a numerical answer without units, written inside \\boxed{}."
# rl_loop's own few-shot prefix, so that sl_loop trains on the prompts rl_loop will sample from.
PREFIX = [
    {"role": "user", "content": "How many r's are in strawberry?" + SUFFIX},
    {
        "role": "assistant",
        "content": "Let's spell the word out and number all the letters: 1) s 2) t 3) r 4) a 5) w 6) b 7) e 8) r "
        "9) r 10) y. We have r's at positions 3, 8, and 9. \\boxed{3}",
    },
]
RL_STEPS = 3


@pytest.fixture(scope="module")
def cookbook_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    arguments = ["--served-model-name", MODEL_NAME, "--console-port", "0"]  # (its port serves weights.download's URLs)
    with running_server(tmp_path_factory.mktemp("cookbook-server"), arguments) as address:
        yield address


def resume_from(log_path: Path, state_path: str) -> None:
    """Makes the cookbook resume from `state_path` at batch 0: the last record of its checkpoints.jsonl."""
    log_path.mkdir(parents=True, exist_ok=True)
    (log_path / "checkpoints.jsonl").write_text(
        json.dumps({"name": "start", "batch": 0, "state_path": state_path}) + "\n"
    )


def run_recipe(address: str, module: str, data: dict[str, list[dict]], workdir: Path, **options: object) -> None:
    """Runs the recipe in `workdir` (its log_path unless `options` name another) to completion;
    fails the test with its stderr if it does not exit cleanly."""
    workdir.mkdir(parents=True, exist_ok=True)
    data_file = workdir / "data.json"
    data_file.write_text(json.dumps(data))
    arguments = {"base_url": address, "model_name": MODEL_NAME, "log_path": workdir, "save_every": 0, **options}
    command = [sys.executable, "-m", "tinker_client.as_tinker", str(ROOT / "tests/cookbook/run_recipe.py"), module]
    command += [str(data_file), *(f"{key}={value}" for key, value in arguments.items())]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=workdir)
    assert finished.returncode == 0, finished.stderr[-4000:]
    assert "Traceback" not in finished.stderr and "Task was destroyed" not in finished.stderr, finished.stderr[-4000:]


def metrics(log_path: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (log_path / "metrics.jsonl").read_text().splitlines()]


def question(rng: random.Random) -> str:
    """Questions whose answer is 2: the reward then tells well-formed answers from the rest."""
    left = rng.randint(-3, 5)
    return f"What is {left} + {2 - left}?"


@pytest.fixture(scope="module")
def sl_run(cookbook_server: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sl_loop on conversations whose last answer is \\boxed{2}: it learns the answer format."""
    rng = random.Random(0)
    rows = [
        {
            "messages": [
                *PREFIX,
                {"role": "user", "content": question(rng) + SUFFIX},
                {"role": "assistant", "content": "\\boxed{2}"},
            ]
        }
        for _ in range(160)
    ]
    log_path = tmp_path_factory.mktemp("sl_loop")
    with ServiceClient(base_url=cookbook_server) as service:
        seeded = service.create_lora_training_client(MODEL_NAME, rank=16, seed=0).result()
        resume_from(log_path, seeded.save_state("seeded").result().path)
    run_recipe(
        cookbook_server,
        "tinker_cookbook.recipes.sl_loop",
        {"train": rows},
        log_path,
        batch_size=4,
        learning_rate=2e-3,
        lora_rank=16,
        train_on_what="last_assistant_message",
    )
    return log_path


def test_sl_loop_trains_and_saves_its_final_checkpoint(cookbook_server, sl_run):
    steps = metrics(sl_run)
    assert [step["step"] for step in steps] == list(range(40))
    first, last = steps[0]["train_mean_nll"], steps[-1]["train_mean_nll"]
    assert last < 0.2 * first, (first, last)
    final = json.loads((sl_run / "checkpoints.jsonl").read_text().splitlines()[-1])
    assert final["state_path"].endswith("/weights/final") and final["sampler_path"].endswith("/sampler_weights/final")
    # The recipe labelled its run through ServiceClient(user_metadata=...): the server kept the label.
    run = RestClient(base_url=cookbook_server).get_training_run_by_tinker_path(final["state_path"]).result()
    assert run.user_metadata["recipe_name"] == "recipe_sl_loop"


def test_weights_download_fetches_a_training_checkpoints_adapter(cookbook_server, sl_run, tmp_path):
    """The cookbook's own weights.download: it loads the checkpoint into a new run, exports it
    age-encrypted to a key of its own, fetches the files over their signed URLs, decrypts them,
    and deletes the export. What it wrote is the checkpoint's adapter, tensor for tensor."""
    state = json.loads((sl_run / "checkpoints.jsonl").read_text().splitlines()[-1])["state_path"]
    script = tmp_path / "download.py"
    script.write_text(
        "import sys\nfrom tinker_cookbook import weights\n"
        "weights.download(tinker_path=sys.argv[1], output_dir=sys.argv[2], base_url=sys.argv[3])\n"
    )
    output = tmp_path / "adapter"
    command = [sys.executable, "-m", "tinker_client.as_tinker", str(script), state, str(output), cookbook_server]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr[-4000:]
    assert sorted(path.name for path in output.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    rest = RestClient(base_url=cookbook_server)
    archive = rest.download_checkpoint_archive_from_tinker_path(state, tmp_path / "state.tar").result()
    with tarfile.open(archive) as tar:
        saved = safetensors.torch.load(tar.extractfile("adapter_model.safetensors").read())
        state_config = json.loads(tar.extractfile("adapter_config.json").read())
    downloaded = safetensors.torch.load_file(str(output / "adapter_model.safetensors"))
    assert saved.keys() == downloaded.keys() and all(torch.equal(saved[key], downloaded[key]) for key in saved)
    # Both name the base model as clients know it (served under a hub name here): peft loads that one.
    assert json.loads((output / "adapter_config.json").read_text())["base_model_name_or_path"] == MODEL_NAME
    assert state_config["base_model_name_or_path"] == MODEL_NAME
    exports = [c for c in rest.list_user_checkpoints().result().checkpoints if c.checkpoint_type == "external"]
    assert exports == []  # the download deleted its temporary export


@pytest.mark.parametrize("loss_fn", ["stable_reinforce", "importance_sampling"])
def test_rl_loop_resumes_from_sl_and_trains_every_step_it_can(cookbook_server, sl_run, tmp_path, loss_fn):
    rng = random.Random(1)
    rows = [{"question": question(rng), "answer": "It is 2.\n#### 2"} for _ in range(4 * RL_STEPS)]
    sl_final = json.loads((sl_run / "checkpoints.jsonl").read_text().splitlines()[-1])
    log_path = tmp_path / "rl_loop"
    resume_from(log_path, sl_final["state_path"])
    run_recipe(
        cookbook_server,
        "tinker_cookbook.recipes.rl_loop",
        {"train": rows},
        log_path,
        batch_size=4,
        group_size=16,
        max_tokens=16,
        max_steps=RL_STEPS,
        learning_rate=1e-3,
        loss_fn=loss_fn,
    )
    steps = metrics(log_path)
    assert [step["step"] for step in steps] == list(range(RL_STEPS))
    # A step trains unless every group's rewards were equal (the recipe then skips it by design);
    # an API error would have ended the recipe with an error instead.
    trained = [step for step in steps if "grad_norm" in step]
    assert trained and all(0 < step["grad_norm"] < float("inf") for step in trained), steps
    assert any(step["reward/total"] > 0 for step in steps)


def test_math_rl_trains_through_the_cookbooks_full_rl_trainer(cookbook_server, tmp_path):
    """recipes/math_rl runs rl.train, the trainer real RL code uses (rl_loop is a minimal loop):
    its data processing builds each chunk from one buffer it then clears, and it attaches
    provenance spans to every datum, whatever the loss."""
    log_path = tmp_path / "math_rl" / "log"  # made by the recipe, which asks what to do with one that exists
    run_recipe(
        cookbook_server,
        "tinker_cookbook.recipes.math_rl.train",
        {},
        tmp_path / "math_rl",
        log_path=log_path,
        env="arithmetic",  # problems made up locally: no data set to fetch
        group_size=4,
        groups_per_batch=2,
        max_tokens=8,
        max_steps=2,
        learning_rate=1e-4,
        lora_rank=8,
        loss_fn="importance_sampling",
        eval_every=0,
    )
    steps = metrics(log_path)
    assert [step["step"] for step in steps] == [0, 1, 2]  # two batches, then the run's totals
    for step in steps[:2]:
        # Each datum is its whole episode: observation and action, less the last action token.
        episodes, observed, acted = (step[f"env/all/total_{key}"] for key in ("episodes", "ob_tokens", "ac_tokens"))
        assert step["tokens/trained"] == observed + acted - episodes
        assert abs(step["optim/kl_sample_train_v1"]) < 1e-4  # the trainer's logprobs are the sampler's

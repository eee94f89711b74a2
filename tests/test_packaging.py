"""`pip install .` without extras: the client installs without torch and talks to a server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CLIENT_SCRIPT = """
import sys
from tinker_client import ServiceClient, types
assert "torch" not in sys.modules
service = ServiceClient(base_url=sys.argv[1])
name = service.get_server_capabilities().supported_models[0].model_name
training = service.create_lora_training_client(name, rank=4, seed=0)
tokens = types.ModelInput.from_ints([256, 72, 105])
datum = types.Datum(model_input=tokens, loss_fn_inputs={"target_tokens": [72, 105, 33]})
print(training.forward([datum], "cross_entropy").result().metrics["loss:sum"])
service.close()
"""


def test_a_client_only_install_pulls_no_torch_and_talks_to_the_server(server, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", str(ROOT)], check=True, timeout=600)
    installed = subprocess.run([str(python), "-m", "pip", "list"], capture_output=True, text=True, check=True).stdout
    assert "tinker-grpc" in installed
    assert not any(line.split()[0].lower() in ("torch", "peft") for line in installed.splitlines()[2:])
    typed = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.resources as r; print(r.files('tinker_client').joinpath('py.typed').is_file())",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert typed.strip() == "True"
    loss = subprocess.run(
        [str(python), "-c", CLIENT_SCRIPT, server.address], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    assert float(loss) > 0

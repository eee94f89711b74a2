"""Packaging from a clean clone: `python -m build`, `pip install .`, `pip install -e .`, and a client-only wheel.

Each step clones HEAD afresh, since building generates tinker_rpc/ into the source tree, which would hide a clean
clone's failure from the next step. Uncommitted changes are not covered (CI runs on a clean clone);
PACKAGING_TEST_REPO points the test at another repository, e.g. a scratch clone with a work-in-progress commit.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from generate_protos import runtime_requirements  # noqa: E402

SOURCE = os.environ.get("PACKAGING_TEST_REPO", str(ROOT))
# A PYTHONPATH pointing at a checkout would let the venv import that instead of what it installed. Byte-compiling
# every installed file (transformers has thousands) would be most of the installs' time, and is not under test.
ENV = {**{key: value for key, value in os.environ.items() if key != "PYTHONPATH"}, "PIP_COMPILE": "0"}

ALIAS_SCRIPT = """
import importlib.metadata
import subprocess
import sys
import tinker
print(tinker.__name__, importlib.metadata.version("tinker"))
subprocess.run([sys.executable, "-c", "import tinker; print(tinker.__name__)"], check=True)
"""
CLIENT_SCRIPT = """
import importlib.resources, sys
import tinker_client
from tinker_client import ServiceClient, types
assert "torch" not in sys.modules
assert tinker_client.__file__.startswith(sys.prefix), tinker_client.__file__
assert importlib.resources.files("tinker_client").joinpath("py.typed").is_file()
service = ServiceClient(base_url=sys.argv[1])
name = service.get_server_capabilities().supported_models[0].model_name
training = service.create_lora_training_client(name, rank=4, seed=0).result()
tokens = types.ModelInput.from_ints([256, 72, 105])
datum = types.Datum(model_input=tokens, loss_fn_inputs={"target_tokens": [72, 105, 33]})
print(training.forward([datum], "cross_entropy").result().metrics["loss:sum"])
service.close()
"""


def run(*command: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(part) for part in command], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result


def assert_no_deprecations(result: subprocess.CompletedProcess[str]) -> None:
    """Nor setuptools' warning that it may leave a directory of package data out."""
    output = result.stdout + result.stderr
    assert [line for line in output.splitlines() if "deprecat" in line.lower() or "would be ignored" in line] == []


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("packaging")


def fresh_clone(workdir: Path, name: str) -> Path:
    run("git", "clone", "-q", SOURCE, workdir / name, cwd=workdir)
    return workdir / name


@pytest.fixture(scope="module")
def dist(workdir: Path) -> Path:
    """The sdist, and the wheel that build makes from it (so the sdist must carry protos/ and the generator)."""
    clone = fresh_clone(workdir, "for-build")
    assert_no_deprecations(run(sys.executable, "-m", "build", "--outdir", workdir / "dist", clone, cwd=workdir))
    return workdir / "dist"


def test_build_makes_an_sdist_with_the_protos_and_a_wheel_with_the_generated_code(dist):
    (sdist,) = dist.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    assert {"scripts/generate_protos.py", "protos/tinker_rpc/v1/service.proto"} <= names
    (wheel,) = dist.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert {f"tinker_rpc/v1/service_pb2{suffix}" for suffix in (".py", ".pyi", "_grpc.py")} <= names
    assert "tinker_wire/tensor_codec.py" in names
    console = {
        f"tinker_server/console/{name}" for name in ("static/chart.js", "static/console.css", "templates/run.html")
    }
    assert console <= names, "the console's pages and script ship in the wheel (the server runs offline)"
    unpacked = dist.parent / "unpacked"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(unpacked, [name for name in names if name.startswith("tinker_rpc/")])
        metadata = archive.read(
            next(name for name in names if name.startswith("tinker_grpc-") and name.endswith("/METADATA"))
        ).decode()
    requires = {line.split(": ", 1)[1] for line in metadata.splitlines() if line.startswith("Requires-Dist: ")}
    # The generated code refuses a grpcio or protobuf older than what generated it: the wheel asks for those.
    floors = runtime_requirements(unpacked)
    assert floors[0].startswith("grpcio>=1.") and floors[1].startswith("protobuf>=")
    assert set(floors) <= requires


def test_the_wheel_alone_is_a_client_that_talks_to_the_server_and_the_source_installs_work(server, dist, workdir):
    # One venv for the three installs, the wheel first so that it is installed alone; the outer pip installs into
    # it (--python), which saves a pip per venv. Not --system-site-packages: it would see torch.
    venv = workdir / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=workdir)
    python, pip = venv / "bin" / "python", (sys.executable, "-m", "pip", "--python", venv / "bin" / "python")

    def assert_installed_from(origin: Path) -> None:
        where = run(python, "-c", "import tinker_rpc.v1.service_pb2 as m; print(m.__file__)", cwd=workdir).stdout
        assert Path(where.strip()).is_relative_to(origin)
        assert (venv / "bin" / "tinker-grpc").exists()
        assert not (venv / "bin" / "tinker").exists(), "would overwrite the official tinker SDK's command"

    (wheel,) = dist.glob("*.whl")
    run(*pip, "install", "-q", wheel, cwd=workdir)
    assert_installed_from(venv)
    installed = run(*pip, "list", cwd=workdir).stdout
    assert not any(line.split()[0].lower() in ("torch", "peft") for line in installed.splitlines()[2:])
    loss = run(python, "-c", CLIENT_SCRIPT, server.address, cwd=workdir).stdout
    assert float(loss) > 0
    assert "usage: tinker-grpc" in run(venv / "bin" / "tinker-grpc", "--help", cwd=workdir).stdout
    # The server's command is there too: without the server's extras it says what to install, in one line.
    no_server = subprocess.run([venv / "bin" / "tinker-server", "--help"], capture_output=True, text=True, env=ENV)
    assert no_server.returncode == 1 and "Traceback" not in no_server.stderr
    assert "pip install 'tinker-grpc[server]'" in no_server.stderr
    # Unchanged tinker code runs on the installed wheel, in spawned processes too.
    (workdir / "uses_tinker.py").write_text(ALIAS_SCRIPT)
    aliased = run(python, "-m", "tinker_client.as_tinker", workdir / "uses_tinker.py", cwd=workdir).stdout
    assert aliased.split() == ["tinker_client", "0.38.0", "tinker_client"]

    installing = run(*pip, "install", "-v", fresh_clone(workdir, "for-install"), cwd=workdir)
    assert "Successfully installed tinker-grpc" in installing.stdout
    assert_no_deprecations(installing)
    assert_installed_from(venv)

    editable = fresh_clone(workdir, "for-editable")
    assert_no_deprecations(run(*pip, "install", "-v", "-e", editable, cwd=workdir))
    assert_installed_from(editable)


def test_the_server_never_imports_the_client_sdk():
    """Both sides share only tinker_rpc (generated) and tinker_wire: the SDK can change alone."""
    check = (
        "import sys, tinker_server.server, tinker_server.cli, tinker_server.worker.engine; "
        "print(sorted(name for name in sys.modules if name.split('.')[0] == 'tinker_client'))"
    )
    imported = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True).stdout
    assert imported.strip() == "[]"

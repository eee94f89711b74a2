"""The breaking-change check in `make test` really fails on a breaking change."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUF = ROOT / ".tools" / "node_modules" / ".bin" / "buf"


@pytest.fixture
def protos_copy(tmp_path: Path) -> Path:
    if not BUF.exists():
        pytest.skip("buf is installed by `make proto-lint`, which `make test` runs first")
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    return tmp_path


def breaking(workdir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BUF), "breaking", "--against", str(ROOT / "buf" / "released.binpb")],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_current_protos_are_compatible_with_the_released_contract(protos_copy: Path):
    assert breaking(protos_copy).returncode == 0


def test_renumbering_a_field_is_caught(protos_copy: Path):
    tensor = protos_copy / "protos" / "tinker_rpc" / "v1" / "tensor.proto"
    tensor.write_text(tensor.read_text().replace("bytes data = 3;", "bytes data = 4;"))
    result = breaking(protos_copy)
    assert result.returncode != 0 and "data" in result.stdout + result.stderr

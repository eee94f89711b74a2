"""The worker-platform boundary: the default local platform and the scheduler need no Ray."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tinker_server.cli import parse_args
from tinker_server.worker.platform import RaySettings, make_platform

ROOT = Path(__file__).resolve().parents[1]
WITHOUT_RAY = """
import sys
sys.modules["ray"] = None  # `import ray` raises ImportError, as where the extra is not installed
import tinker_server.cli, tinker_server.server, tinker_server.fleet
from tinker_server.worker.platform import RaySettings, make_platform
make_platform("local", RaySettings())
try:
    make_platform("ray", RaySettings(address="127.0.0.1:6379"))
    raise SystemExit("--platform ray started without Ray")
except RuntimeError as error:  # the server logs it and exits 1: a missing extra, not a bug
    assert "pip install '.[ray]'" in str(error), error
import pytest
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "tests/test_scheduler.py"]))
"""


def test_without_ray_the_server_imports_and_the_scheduler_tests_pass():
    done = subprocess.run([sys.executable, "-c", WITHOUT_RAY], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert " passed" in done.stdout and "failed" not in done.stdout


def test_ray_needs_an_explicit_cluster_address(monkeypatch):
    pytest.importorskip("ray")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ValueError, match="--ray-address"):
        make_platform("ray", RaySettings())


def test_the_command_line_refuses_ray_without_a_cluster_address_before_starting(monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(SystemExit) as refused:
        parse_args(["--platform", "ray", "--allow-unauthenticated"])
    assert refused.value.code == 2 and "--ray-address" in capsys.readouterr().err  # a usage error, no traceback
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert parse_args(["--platform", "ray", "--allow-unauthenticated"]).ray.cluster_address() == "127.0.0.1:6379"


def test_an_unknown_platform_is_refused():
    with pytest.raises(ValueError, match="'local' or 'ray'"):
        make_platform("kubernetes", RaySettings())

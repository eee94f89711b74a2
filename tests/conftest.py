"""Shared fixtures: real servers (subprocesses on real ports) and SDK clients."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# Before anything imports gRPC: Ray forks its node processes from this process while the session's
# clients run (tests/test_ray_platform.py), and gRPC's fork handlers could crash such a child
# (see tinker_server/__init__.py).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from server_process import running_server  # noqa: E402

from tinker_client import ServiceClient  # noqa: E402

BASE_MODEL = "embedded/tiny-llama"


@dataclass
class Server:
    address: str
    data_dir: Path


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The default server: embedded model, continuous cycles. The whole suite shares its one
    owner, hence a per-owner run cap above the default."""
    data_dir = tmp_path_factory.mktemp("server")
    with running_server(data_dir, ["--max-runs-per-owner", "1024"]) as address:
        yield Server(address, data_dir)


@pytest.fixture(scope="session")
def service(server: Server) -> Iterator[ServiceClient]:
    client = ServiceClient(base_url=server.address)
    yield client
    client.close()

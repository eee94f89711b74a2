"""`tinker-server` starts, reports its address, and exits cleanly on SIGTERM and SIGINT."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from server_process import server_command

from tinker_client import ServiceClient


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_server_and_worker(tmp_path: Path, signum: int):
    command = server_command(tmp_path)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "bound on" in process.stdout.readline()  # up, health NOT_SERVING while the model loads
        address = re.search(r"listening on (\S+)", process.stdout.readline()).group(1)
        assert ServiceClient(base_url=address).get_server_capabilities().supported_models
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    worker_pid = int(re.search(r"worker pid (\d+)", stderr).group(1))
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{worker_pid}") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{worker_pid}"), "the worker process outlived the server"
    assert "server stopped" in stderr


def test_json_logs_are_one_object_per_line_from_server_and_worker(tmp_path: Path):
    import json

    command = server_command(tmp_path, ["--log-format", "json"])
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while "listening on" not in process.stdout.readline():
            pass
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    records = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    loggers = {record["logger"] for record in records}
    assert "tinker_server.server" in loggers and "tinker_server.worker.main" in loggers
    assert all({"time", "level", "logger", "message"} <= set(record) for record in records)

"""Starts a `tinker-server` subprocess on a free port and stops it on exit (demo and tests)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

_LISTENING = re.compile(r"tinker-server listening on (\S+):(\d+)")


def server_command(data_dir: Path, extra_args: Sequence[str] = ()) -> list[str]:
    """`tinker-server` on a free port; open (no API keys) unless keys are configured."""
    command = [sys.executable, "-m", "tinker_server", "--port", "0", "--data-dir", str(data_dir), *extra_args]
    if "--api-keys-file" not in extra_args and "TINKER_API_KEYS" not in os.environ:
        command.append("--allow-unauthenticated")  # a local, single-user server
    return command


def start_server(
    data_dir: Path, extra_args: Sequence[str] = (), startup_timeout: float = 120.0, log_path: Path | None = None
) -> tuple[subprocess.Popen[str], str]:
    """Starts a server; returns the process and its address ('127.0.0.1:PORT') once it listens."""
    log_path = log_path or data_dir / "server.log"
    data_dir.mkdir(parents=True, exist_ok=True)
    command = server_command(data_dir, extra_args)
    with open(log_path, "a") as log:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=log, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
    try:
        return process, _wait_for_address(process, startup_timeout, log_path)
    except BaseException:
        stop_server(process)
        raise


def stop_server(process: subprocess.Popen[str]) -> None:
    """SIGTERM, then SIGKILL if it does not exit in 30 s."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    if process.stdout is not None:
        process.stdout.close()


@contextmanager
def running_server(
    data_dir: Path, extra_args: Sequence[str] = (), startup_timeout: float = 120.0, log_path: Path | None = None
) -> Iterator[str]:
    """Yields the server's address; stops the server on exit."""
    process, address = start_server(data_dir, extra_args, startup_timeout, log_path)
    try:
        yield address
    finally:
        stop_server(process)


def _wait_for_address(process: subprocess.Popen[str], timeout: float, log_path: Path) -> str:
    deadline = time.monotonic() + timeout
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            raise RuntimeError(
                f"tinker-server exited with {process.returncode}; see {log_path}:\n{log_path.read_text()}"
            )
        if match := _LISTENING.search(line):
            return f"{match.group(1)}:{match.group(2)}"
    raise TimeoutError(f"tinker-server did not start within {timeout}s; see {log_path}")

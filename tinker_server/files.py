"""Checkpoint directories on disk, written whole or not at all."""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

STAGING_PREFIX = "."
"""Directories being written are hidden: no checkpoint name starts with a dot."""
UPLOADS_DIR = "uploads"
"""Under the data dir: files being received, before they become a checkpoint."""


def write_whole(directory: Path, write: Callable[[Path], None]) -> None:
    """Makes `directory` a checkpoint whole or not at all: `write` fills a hidden sibling, whose
    files are flushed to disk before it is renamed into place (replacing an earlier one). A crash
    or a full disk leaves at most a hidden leftover, never a torn checkpoint under its name."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{directory.name}.", dir=directory.parent))
    try:
        write(staging)
        for file in staging.iterdir():
            _fsync(file)
        if directory.exists():  # an overwrite: the old one goes once the new one is in place
            retired = staging.with_name(f"{staging.name}.old")
            directory.rename(retired)
            staging.rename(directory)
            shutil.rmtree(retired)
        else:
            staging.rename(directory)
        _fsync(directory.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def remove_staging_leftovers(data_dir: Path) -> None:
    """Checkpoints a crash left half written (hidden, so never loaded) under runs/<run>/<kind>/,
    and uploads it cut short."""
    for leftover in [*data_dir.glob(f"runs/*/*/{STAGING_PREFIX}*"), data_dir / UPLOADS_DIR]:
        shutil.rmtree(leftover, ignore_errors=True)


def write_tar(directory: Path, archive: BinaryIO) -> int:
    """A checkpoint's files as an uncompressed tar (weights do not compress); its size."""
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for file in sorted(directory.iterdir()):
            tar.add(file, arcname=file.name)
    return archive.tell()

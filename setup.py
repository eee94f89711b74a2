"""Generates the gRPC code from protos/ before setuptools reads the configuration, so a clean clone installs.

This cannot wait for `build_py`: setuptools finds the packages (pyproject.toml) when setup() reads the
configuration, and `egg_info`, which pip and build run first, already needs their directories.
"""

from __future__ import annotations

import sys
from pathlib import Path

from setuptools import setup

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))

from generate_protos import generate  # noqa: E402

generate()
setup()

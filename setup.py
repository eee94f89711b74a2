"""`pip install .` generates the gRPC code from protos/ first, so a clean clone installs."""

from __future__ import annotations

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))

from generate_protos import generate  # noqa: E402


class BuildWithProtos(build_py):
    def run(self) -> None:
        generate()
        super().run()


setup(cmdclass={"build_py": BuildWithProtos})

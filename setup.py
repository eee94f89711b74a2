"""Generates the gRPC code from protos/ before setuptools reads the configuration, so a clean clone installs.

This cannot wait for `build_py`: setuptools finds the packages (pyproject.toml) when setup() reads the
configuration, and `egg_info`, which pip and build run first, already needs their directories.
The dependencies are declared here, not in pyproject.toml: grpcio's and protobuf's floors are those
of the code just generated (whatever grpcio-tools the build found), which refuses older runtimes.
"""

from __future__ import annotations

import sys
from pathlib import Path

from setuptools import setup

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))

from generate_protos import generate, runtime_requirements  # noqa: E402

# The client needs no torch: numpy for tensors, grpc for the wire, transformers for get_tokenizer().
REQUIREMENTS = [
    "numpy>=1.26",
    "transformers>=5.17,<6",  # 5.17: the oldest release the whole suite has passed on
    "tqdm>=4.66",
]

generate()
setup(install_requires=[*runtime_requirements(), *REQUIREMENTS])

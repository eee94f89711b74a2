"""Generates tinker_rpc/ (messages, .pyi stubs, gRPC stubs) from protos/. Used by `make proto`
and by `pip install .` (setup.py), so both always build the same code."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def generate(root: Path = ROOT) -> None:
    from grpc_tools import protoc

    protos = sorted(str(path.relative_to(root / "protos")) for path in (root / "protos").rglob("*.proto"))
    arguments = [
        "grpc_tools.protoc",
        f"-I{root / 'protos'}",
        f"--python_out={root}",
        f"--pyi_out={root}",
        f"--grpc_python_out={root}",
        *protos,
    ]
    if protoc.main(arguments) != 0:
        raise RuntimeError(f"protoc failed on {protos}")
    for directory in {(root / proto).parent for proto in protos} | {root / "tinker_rpc"}:
        (directory / "__init__.py").touch()


def runtime_requirements(root: Path = ROOT) -> list[str]:
    """The runtimes the generated code accepts at import: grpcio at least the grpcio-tools that
    generated it, protobuf at least its protoc. setup.py declares them, so that pip never installs
    the package beside a grpcio or protobuf that refuses to load it."""
    stubs = (root / "tinker_rpc" / "v1" / "service_pb2_grpc.py").read_text()
    grpc_version = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", stubs).group(1)
    messages = (root / "tinker_rpc" / "v1" / "service_pb2.py").read_text()
    protobuf_version = re.search(r"Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),", messages).groups()
    return [f"grpcio>={grpc_version}", f"protobuf>={'.'.join(protobuf_version)}"]


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)

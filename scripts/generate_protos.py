"""Generates tinker_rpc/ (messages, .pyi stubs, gRPC stubs) from protos/. Used by `make proto`
and by `pip install .` (setup.py), so both always build the same code."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def generate(root: Path = ROOT) -> None:
    from grpc_tools import protoc

    protos = sorted(str(path.relative_to(root / "protos")) for path in (root / "protos").rglob("*.proto"))
    arguments = ["grpc_tools.protoc", f"-I{root / 'protos'}", f"--python_out={root}", f"--pyi_out={root}",
                 f"--grpc_python_out={root}", *protos]
    if protoc.main(arguments) != 0:
        raise RuntimeError(f"protoc failed on {protos}")
    for directory in {(root / proto).parent for proto in protos} | {root / "tinker_rpc"}:
        (directory / "__init__.py").touch()


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)

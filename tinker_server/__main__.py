"""`tinker-server` and `python -m tinker_server`: the server's command line, or a one-line hint where
its dependencies are missing (a client-only install of tinker-grpc)."""

from __future__ import annotations

import sys

_OURS = ("tinker_server", "tinker_rpc", "tinker_wire", "tinker_client")


def main() -> None:
    try:
        from tinker_server.cli import main as serve
    except ModuleNotFoundError as error:
        if error.name is None or error.name.split(".")[0] in _OURS:
            raise
        sys.exit(
            f"tinker-server: no module {error.name!r}: the server needs its extras, "
            "`pip install 'tinker-grpc[server]'` (on a GPU machine install torch first: see the README)"
        )
    serve()


if __name__ == "__main__":
    main()

"""The web console: runs, their loss curves and checkpoints, and (for admins) the server, read-only,
served over HTTP by the server process beside the gRPC API (--console-port)."""

"""tinker_server: a self-hostable LoRA fine-tuning service with a gRPC API."""

import os

# gRPC's core handles fork() by default (pthread_atfork): a child forked while its threads run
# can crash in gRPC before it execs. The server never uses gRPC in a child: its workers are
# spawned, and Ray's node processes (--ray-address local) are forked to exec at once.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

"""`tinker-server admin`: list a running server's replicas, add or drain one, move runs.

tinker-server admin list
tinker-server admin add-replica BASE_MODEL
tinker-server admin drain REPLICA_ID
tinker-server admin migrate MODEL_ID [REPLICA_ID]
tinker-server admin rebalance BASE_MODEL
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import grpc
from google.protobuf.json_format import MessageToDict

from tinker_rpc.v1 import admin_pb2, admin_pb2_grpc


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tinker-server admin", description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1:50051", help="the server (default %(default)s)")
    parser.add_argument(
        "--api-key", default=os.environ.get("TINKER_API_KEY"), help="an admin owner's key (default: $TINKER_API_KEY)"
    )
    parser.add_argument("--tls-ca", default=None, help="PEM root certificates: connect with TLS")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="every replica and the runs on it")
    commands.add_parser("add-replica", help="start one more replica of a base model").add_argument("base_model")
    commands.add_parser("drain", help="move every run off a replica, then stop it").add_argument("replica_id")
    migrate = commands.add_parser("migrate", help="move a run to another replica")
    migrate.add_argument("model_id")
    migrate.add_argument("replica_id", nargs="?", default="", help="default: the least loaded other replica")
    commands.add_parser("rebalance", help="even out runs over a model's replicas").add_argument("base_model")
    return parser.parse_args(argv)


def call(args: argparse.Namespace, stub: admin_pb2_grpc.AdminServiceStub) -> object:
    metadata = [("authorization", f"Bearer {args.api_key}")] if args.api_key else []
    if args.command == "list":
        return stub.ListReplicas(admin_pb2.ListReplicasRequest(), metadata=metadata)
    if args.command == "add-replica":
        return stub.AddReplica(admin_pb2.AddReplicaRequest(base_model=args.base_model), metadata=metadata)
    if args.command == "drain":
        return stub.DrainReplica(admin_pb2.DrainReplicaRequest(replica_id=args.replica_id), metadata=metadata)
    if args.command == "migrate":
        request = admin_pb2.MigrateRunRequest(model_id=args.model_id, replica_id=args.replica_id)
        return stub.MigrateRun(request, metadata=metadata)
    return stub.Rebalance(admin_pb2.RebalanceRequest(base_model=args.base_model), metadata=metadata)


def main(argv: list[str]) -> None:
    """Prints the answer as JSON; exits 1 with the server's message on an error."""
    args = parse_args(argv)
    if args.tls_ca:
        with open(args.tls_ca, "rb") as roots:
            channel = grpc.secure_channel(args.address, grpc.ssl_channel_credentials(roots.read()))
    else:
        channel = grpc.insecure_channel(args.address)
    with channel:
        try:
            reply = call(args, admin_pb2_grpc.AdminServiceStub(channel))
        except grpc.RpcError as error:
            print(f"{error.code().name}: {error.details()}", file=sys.stderr)
            sys.exit(1)
    print(json.dumps(MessageToDict(reply, preserving_proto_field_name=True), indent=2))

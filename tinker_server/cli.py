"""`tinker-server`: serve a base model over gRPC."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tomllib
from pathlib import Path

from tinker_server.api.requests import Limits
from tinker_server.auth import ApiKeys
from tinker_server.config import ServerConfig
from tinker_server.fleet import ModelSpec
from tinker_server.logs import configure_logging
from tinker_server.ops import WorkerOptions
from tinker_server.scheduler import DEFAULT_MAX_CYCLE_TOKENS, CyclePolicy
from tinker_server.server import serve
from tinker_server.worker.platform import RaySettings

ENV_PREFIX = "TINKER_SERVER_"


def apply_environment(parser: argparse.ArgumentParser) -> None:
    """Every flag can come from the environment: --max-adapters from TINKER_SERVER_MAX_ADAPTERS,
    and so on. A flag on the command line wins over the environment."""
    for action in parser._actions:
        value = os.environ.get(ENV_PREFIX + action.dest.upper())
        if value is None or action.dest == "help":
            continue
        if isinstance(action, argparse._StoreTrueAction):
            action.default = value.lower() in ("1", "true", "yes", "on")
        elif isinstance(action, argparse._AppendAction):
            action.default = value.split(",")
        else:
            try:
                action.default = action.type(value) if action.type else value
            except (TypeError, ValueError) as error:
                parser.error(f"{ENV_PREFIX}{action.dest.upper()}={value!r}: {error}")
            if action.choices is not None and action.default not in action.choices:  # argparse checks only flags
                parser.error(f"{ENV_PREFIX}{action.dest.upper()}={value!r}: choose from {', '.join(action.choices)}")


def parse_args(argv: list[str] | None = None) -> ServerConfig:
    parser = argparse.ArgumentParser(prog="tinker-server", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    parser.add_argument("--port", type=int, default=50051, help="port; 0 picks a free one (default %(default)s)")
    parser.add_argument(
        "--base-model",
        action="append",
        default=None,
        metavar="PATH",
        help="local Hugging Face model directory, or 'embedded' (the embedded tiny Llama, the default); "
        "repeat to serve several base models",
    )
    parser.add_argument(
        "--served-model-name",
        action="append",
        default=None,
        metavar="NAME",
        help="the name clients use for the base model, e.g. its hub id for code written against it "
        "(default: embedded/tiny-llama, or the --base-model path); one per --base-model, in order",
    )
    parser.add_argument(
        "--replicas", type=int, default=1, help="replicas of each base model, each a worker (default %(default)s)"
    )
    parser.add_argument(
        "--models-file",
        type=Path,
        default=None,
        help="TOML file of [[model]] tables (path, name, replicas), instead of --base-model",
    )
    parser.add_argument(
        "--max-runs-per-replica",
        type=int,
        default=ServerConfig.max_runs_per_replica,
        help="live training runs one replica takes; a new run goes to the least loaded (default %(default)s)",
    )
    parser.add_argument(
        "--platform",
        default="local",
        choices=["local", "ray"],
        help="where replicas run: local (a spawned process each, the default) or ray (an actor each; "
        "pip install '.[ray]')",
    )
    parser.add_argument(
        "--ray-address",
        default=None,
        help="the Ray cluster that --platform ray joins (default: $RAY_ADDRESS; 'local': start a private one)",
    )
    parser.add_argument(
        "--ray-gpus-per-replica", type=float, default=RaySettings.gpus_per_replica, help="GPUs each replica reserves"
    )
    parser.add_argument(
        "--ray-cpus-per-replica",
        type=float,
        default=RaySettings.cpus_per_replica,
        help="CPUs each replica reserves (its torch threads) (default %(default)s)",
    )
    parser.add_argument(
        "--ray-resources-per-replica",
        type=json.loads,
        default={},
        metavar="JSON",
        help="custom Ray resources each replica reserves, e.g. '{\"replica\": 1}'",
    )
    parser.add_argument(
        "--dtype",
        default=WorkerOptions.dtype,
        choices=["auto", "bfloat16", "float16", "float32"],
        help="the base weights' dtype; auto: bfloat16 on a GPU that has it, else float32 (LoRA weights and "
        "their optimizer state are float32 always)",
    )
    parser.add_argument(
        "--max-tokens-per-pass",
        type=int,
        default=WorkerOptions.max_tokens_per_pass,
        help="padded tokens one forward/backward pass takes; larger batches run as micro-batches whose "
        "gradients add up, and sampling prefills prompts in passes of similar lengths within it (default %(default)s)",
    )
    parser.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="recompute each decoder layer in backward instead of keeping its activations: less memory, "
        "for one more forward pass of the decoder",
    )
    parser.add_argument(
        "--decode-chunk-seconds",
        type=float,
        default=WorkerOptions.decode_chunk_seconds,
        help="how long a cycle generates before answering; generations go on over the next cycles, so "
        "training never waits behind a whole one (default %(default)s)",
    )
    parser.add_argument(
        "--kv-cache-bytes",
        type=int,
        default=WorkerOptions.kv_cache_bytes,
        help="device bytes for sampling's keys and values, prompts kept for reuse and the weights copies "
        "generations read; samples wait while what runs leaves no room for theirs (default 0: half the GPU "
        "memory free once the model is loaded, 4 GiB on a CPU)",
    )
    parser.add_argument("--data-dir", type=Path, default=Path("tinker-data"), help="where weights are saved")
    parser.add_argument(
        "--cycle",
        type=CyclePolicy.parse,
        default=CyclePolicy(),
        help="'continuous' (default) or 'fixed:SECONDS'",
    )
    parser.add_argument(
        "--max-cycle-tokens",
        type=int,
        default=DEFAULT_MAX_CYCLE_TOKENS,
        help="tokens one cycle may take across all tenants (default %(default)s)",
    )
    parser.add_argument(
        "--max-message-bytes", type=int, default=256 << 20, help="largest gRPC message accepted (default 256 MiB)"
    )
    parser.add_argument(
        "--result-retention-seconds",
        type=float,
        default=3600.0,
        help="how long results stay retrievable by future_id, restarts included (default %(default)s)",
    )
    parser.add_argument(
        "--sweep-interval",
        type=float,
        default=10.0,
        help="seconds between deletions of expired checkpoints and results (default %(default)s)",
    )
    parser.add_argument(
        "--api-keys-file",
        type=Path,
        default=None,
        help="file of 'KEY OWNER' lines; keys may also come from $TINKER_API_KEYS as KEY=OWNER,...",
    )
    parser.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="serve without API keys (everyone is one anonymous owner); logged loudly",
    )
    parser.add_argument(
        "--admin-owner",
        action="append",
        default=[],
        metavar="OWNER",
        help="an owner whose API keys may call the AdminService (tinker-server admin); repeat for more",
    )
    parser.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate chain; with --tls-key enables TLS")
    parser.add_argument("--tls-key", type=Path, default=None, help="PEM private key")
    parser.add_argument(
        "--max-adapters",
        type=int,
        default=Limits.max_adapters,
        help="training runs resident on the device at once; others wait, exactly, in host memory or on disk",
    )
    parser.add_argument(
        "--max-runs-per-owner", type=int, default=Limits.max_runs_per_owner, help="live training runs per API key owner"
    )
    parser.add_argument(
        "--max-resident-snapshot-bytes",
        type=int,
        default=WorkerOptions.max_resident_snapshot_bytes,
        help="device bytes of sampler snapshots; least recently used ones move to host memory, then disk",
    )
    parser.add_argument(
        "--max-host-adapter-bytes",
        type=int,
        default=WorkerOptions.max_host_adapter_bytes,
        help="host memory for adapters moved off a GPU; beyond it they go to disk (default %(default)s)",
    )
    parser.add_argument(
        "--adapter-idle-seconds",
        type=float,
        default=WorkerOptions.adapter_idle_seconds,
        help="an adapter unused this long leaves the device for disk (default %(default)s)",
    )
    parser.add_argument(
        "--ephemeral-ttl-seconds",
        type=float,
        default=Limits.ephemeral_ttl_seconds,
        help="how long an unnamed sampler snapshot lives (a newer one of its run replaces it sooner)",
    )
    parser.add_argument(
        "--max-recorded-sequences-per-owner",
        type=int,
        default=Limits.max_recorded_sequences_per_owner,
        help="sampled sequences kept for stable_reinforce per owner; the least recently used go beyond it",
    )
    parser.add_argument("--max-lora-rank", type=int, default=Limits.max_lora_rank, help="largest LoRA rank accepted")
    parser.add_argument(
        "--max-batch-tokens", type=int, default=Limits.max_batch_tokens, help="tokens one forward/backward may carry"
    )
    parser.add_argument(
        "--max-num-samples", type=int, default=Limits.max_num_samples, help="samples one sample request may ask for"
    )
    parser.add_argument(
        "--max-inflight-requests",
        type=int,
        default=Limits.max_inflight_requests,
        help="acked, unanswered requests per session stream (default %(default)s)",
    )
    parser.add_argument(
        "--max-queued-requests-per-owner",
        type=int,
        default=Limits.max_queued_requests_per_owner,
        help="acked, unanswered requests per API key owner, all streams together (default %(default)s)",
    )
    parser.add_argument(
        "--max-queued-bytes-per-owner",
        type=int,
        default=Limits.max_queued_bytes_per_owner,
        help="bytes of those requests per owner (default %(default)s)",
    )
    parser.add_argument(
        "--max-stored-results-per-owner",
        type=int,
        default=Limits.max_stored_results_per_owner,
        help="results kept for resuming per owner; new requests are refused beyond it (default %(default)s)",
    )
    parser.add_argument(
        "--max-checkpoint-bytes-per-owner",
        type=int,
        default=Limits.max_checkpoint_bytes_per_owner,
        help="bytes of saved checkpoints per owner; saves beyond it are refused (default %(default)s)",
    )
    parser.add_argument(
        "--shutdown-grace",
        type=float,
        default=10.0,
        help="seconds SIGTERM waits for queued requests and the final saves (default %(default)s)",
    )
    parser.add_argument(
        "--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port (0: any free port)"
    )
    parser.add_argument(
        "--console-port",
        type=int,
        default=None,
        help="serve the web console (runs, loss curves, checkpoints; read-only, behind the API keys) on this "
        "port (0: any free port); off by default",
    )
    parser.add_argument(
        "--console-url",
        default="",
        help="the console's public base URL that clients are given, e.g. behind a proxy "
        "(default: http://HOST:CONSOLE_PORT)",
    )
    parser.add_argument(
        "--max-metric-steps-per-run",
        type=int,
        default=Limits.max_metric_steps_per_run,
        help="steps of loss and optimizer metrics kept per run for the console; older ones go (default %(default)s)",
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--log-format", default="text", choices=["text", "json"], help="json: one object per line")
    apply_environment(parser)
    args = parser.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if args.max_tokens_per_pass < 1:
        parser.error(f"--max-tokens-per-pass: {args.max_tokens_per_pass}; give at least 1")
    if args.kv_cache_bytes < 0:
        parser.error(f"--kv-cache-bytes: {args.kv_cache_bytes}; give 0 (sized to the device) or more")
    if args.max_metric_steps_per_run < 1:
        parser.error(f"--max-metric-steps-per-run: {args.max_metric_steps_per_run}; give at least 1")
    try:
        models = model_specs(args.base_model, args.served_model_name, args.replicas, args.models_file)
    except (OSError, ValueError, tomllib.TOMLDecodeError) as error:
        parser.error(str(error))
    try:
        api_keys = ApiKeys.load(args.api_keys_file, os.environ.get("TINKER_API_KEYS"), args.allow_unauthenticated)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    ray = RaySettings(
        address=args.ray_address,
        gpus_per_replica=args.ray_gpus_per_replica,
        cpus_per_replica=args.ray_cpus_per_replica,
        resources_per_replica=args.ray_resources_per_replica,
    )
    if args.platform == "ray":
        try:
            ray.cluster_address()
        except ValueError as error:
            parser.error(str(error))
    configure_logging(args.log_level, args.log_format)
    return ServerConfig(
        host=args.host,
        port=args.port,
        models=models,
        platform=args.platform,
        ray=ray,
        max_runs_per_replica=args.max_runs_per_replica,
        data_dir=args.data_dir,
        worker=WorkerOptions(
            dtype=args.dtype,
            max_tokens_per_pass=args.max_tokens_per_pass,
            activation_checkpointing=args.activation_checkpointing,
            max_resident_runs=args.max_adapters,
            max_resident_snapshot_bytes=args.max_resident_snapshot_bytes,
            max_host_adapter_bytes=args.max_host_adapter_bytes,
            adapter_idle_seconds=args.adapter_idle_seconds,
            spill_dir=str(args.data_dir / "spill"),
            decode_chunk_seconds=args.decode_chunk_seconds,
            kv_cache_bytes=args.kv_cache_bytes,
        ),
        cycle=args.cycle,
        max_cycle_tokens=args.max_cycle_tokens,
        limits=Limits(
            max_message_bytes=args.max_message_bytes,
            max_adapters=args.max_adapters,
            max_runs_per_owner=args.max_runs_per_owner,
            ephemeral_ttl_seconds=args.ephemeral_ttl_seconds,
            max_recorded_sequences_per_owner=args.max_recorded_sequences_per_owner,
            max_lora_rank=args.max_lora_rank,
            max_batch_tokens=args.max_batch_tokens,
            max_num_samples=args.max_num_samples,
            max_inflight_requests=args.max_inflight_requests,
            max_queued_requests_per_owner=args.max_queued_requests_per_owner,
            max_queued_bytes_per_owner=args.max_queued_bytes_per_owner,
            max_stored_results_per_owner=args.max_stored_results_per_owner,
            max_checkpoint_bytes_per_owner=args.max_checkpoint_bytes_per_owner,
            max_metric_steps_per_run=args.max_metric_steps_per_run,
        ),
        api_keys=api_keys,
        admin_owners=frozenset(args.admin_owner),
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        shutdown_grace_seconds=args.shutdown_grace,
        metrics_port=args.metrics_port,
        console_port=args.console_port,
        console_url=args.console_url,
        result_retention_seconds=args.result_retention_seconds,
        sweep_interval_seconds=args.sweep_interval,
    )


EMBEDDED = "embedded"


def model_specs(
    paths: list[str] | None, names: list[str] | None, replicas: int, models_file: Path | None
) -> tuple[ModelSpec, ...]:
    """The served base models, from the flags or a models file."""
    if models_file is not None:
        if paths or names:
            raise ValueError("--models-file replaces --base-model and --served-model-name: give one or the other")
        tables = tomllib.loads(models_file.read_text()).get("model", [])
        if not tables:
            raise ValueError(f"{models_file}: no [[model]] table")
        specs = []
        for number, table in enumerate(tables, start=1):
            if unknown := set(table) - {"path", "name", "replicas"}:
                raise ValueError(f"{models_file}: model {number}: unknown keys {sorted(unknown)}")
            path = table.get("path", EMBEDDED)
            specs.append(ModelSpec(None if path == EMBEDDED else path, table.get("name"), table.get("replicas", 1)))
    else:
        paths = paths or [EMBEDDED]
        if names and len(names) != len(paths):
            raise ValueError(f"--served-model-name: {len(names)} given for {len(paths)} --base-model; one each")
        specs = [
            ModelSpec(None if path == EMBEDDED else path, name, replicas)
            for path, name in zip(paths, names or [None] * len(paths), strict=True)
        ]
    for spec in specs:
        if not isinstance(spec.replicas, int) or spec.replicas < 1:
            raise ValueError(f"replicas of {spec.path or EMBEDDED}: {spec.replicas!r}; give at least 1")
    return tuple(specs)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["admin"]:
        from tinker_server.admin_cli import main as admin_main

        admin_main(argv[1:])
        return
    config = parse_args(argv)
    try:
        asyncio.run(serve(config))
    except RuntimeError as error:
        logging.getLogger("tinker_server").error("%s", error)
        sys.exit(1)


if __name__ == "__main__":
    main()

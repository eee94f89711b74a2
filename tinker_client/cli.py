"""`tinker-grpc`: list training runs and checkpoints, delete and download checkpoints.

tinker-grpc runs list                 tinker-grpc checkpoints list RUN
tinker-grpc runs show RUN             tinker-grpc checkpoints delete PATH
                                      tinker-grpc checkpoints download PATH [-o FILE]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from tinker_client import ServiceClient, TinkerError, types


def _size(size_bytes: int | None) -> str:
    value = float(size_bytes or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    lines = [
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)) for row in [headers, *rows]
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)


def _when(checkpoint: types.Checkpoint | None) -> str:
    return "-" if checkpoint is None else checkpoint.time.strftime("%Y-%m-%d %H:%M:%S")


def _last_saved(run: types.TrainingRun) -> types.Checkpoint | None:
    """The run's newest checkpoint of either kind: weights saved for sampling are one too."""
    saved = [checkpoint for checkpoint in (run.last_checkpoint, run.last_sampler_checkpoint) if checkpoint is not None]
    return max(saved, key=lambda checkpoint: checkpoint.time, default=None)


def runs_list(service: ServiceClient, args: argparse.Namespace) -> None:
    page = service.create_rest_client().list_training_runs(limit=args.limit, offset=args.offset).result()
    rows = [
        (
            run.training_run_id,
            run.base_model,
            str(run.lora_rank),
            run.last_request_time.strftime("%Y-%m-%d %H:%M:%S"),
            _when(_last_saved(run)),
            _size(run.size_bytes),
        )
        for run in page.training_runs
    ]
    print(_table(("RUN", "BASE MODEL", "RANK", "LAST REQUEST", "LAST CHECKPOINT", "DISK"), rows))
    shown = f"{page.cursor.offset + 1}-{page.cursor.offset + len(rows)}" if rows else "none"
    print(f"\n{shown} of {page.cursor.total_count} runs")


def runs_show(service: ServiceClient, args: argparse.Namespace) -> None:
    run = service.create_rest_client().get_training_run(args.run).result()
    for field in ("training_run_id", "base_model", "model_owner", "lora_rank", "last_request_time", "user_metadata"):
        print(f"{field:<18} {getattr(run, field)}")
    print(f"{'disk':<18} {_size(run.size_bytes)}")


def checkpoints_list(service: ServiceClient, args: argparse.Namespace) -> None:
    checkpoints = service.create_rest_client().list_checkpoints(args.run).result().checkpoints
    rows = [
        (
            c.tinker_path,
            c.checkpoint_type,
            _when(c),
            _size(c.size_bytes),
            c.expires_at.strftime("%Y-%m-%d %H:%M:%S") if c.expires_at else "never",
        )
        for c in checkpoints
    ]
    print(_table(("PATH", "TYPE", "SAVED", "SIZE", "EXPIRES"), rows))


def checkpoints_delete(service: ServiceClient, args: argparse.Namespace) -> None:
    service.create_rest_client().delete_checkpoint_from_tinker_path(args.path).result()
    print(f"deleted {args.path}")


def checkpoints_download(service: ServiceClient, args: argparse.Namespace) -> None:
    from tqdm import tqdm

    output = Path(args.output or args.path.removeprefix("tinker://").replace("/", "_") + ".tar")
    with tqdm(unit="B", unit_scale=True, desc=output.name, delay=0.2) as bar:  # drawn once the size is known

        def progress(received: int, total: int) -> None:
            bar.total = total
            bar.update(received - bar.n)

        service.create_rest_client().download_checkpoint_archive_from_tinker_path(args.path, output, progress).result()
    print(f"saved {output}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinker-grpc", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--base-url", default=None, help="server address (default: $TINKER_BASE_URL or localhost:50051)"
    )
    parser.add_argument("--api-key", default=None, help="API key (default: $TINKER_API_KEY)")
    groups = parser.add_subparsers(dest="group", required=True)

    runs = groups.add_parser("runs", help="training runs").add_subparsers(dest="command", required=True)
    listing = runs.add_parser("list", help="list training runs, newest first")
    listing.add_argument("--limit", type=int, default=20)
    listing.add_argument("--offset", type=int, default=0)
    listing.set_defaults(handler=runs_list)
    show = runs.add_parser("show", help="one training run")
    show.add_argument("run")
    show.set_defaults(handler=runs_show)

    checkpoints = groups.add_parser("checkpoints", help="checkpoints").add_subparsers(dest="command", required=True)
    listing = checkpoints.add_parser("list", help="a run's checkpoints")
    listing.add_argument("run")
    listing.set_defaults(handler=checkpoints_list)
    delete = checkpoints.add_parser("delete", help="delete a checkpoint")
    delete.add_argument("path", help="tinker://<run>/weights/<name> or .../sampler_weights/<name>")
    delete.set_defaults(handler=checkpoints_delete)
    download = checkpoints.add_parser("download", help="download a checkpoint as a tar archive")
    download.add_argument("path")
    download.add_argument("-o", "--output", help="archive file (default: derived from the path)")
    download.set_defaults(handler=checkpoints_download)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    service = ServiceClient(base_url=args.base_url, api_key=args.api_key)
    try:
        args.handler(service, args)
    except TinkerError as error:
        print(f"tinker: {error}", file=sys.stderr)
        return 1
    finally:
        service.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

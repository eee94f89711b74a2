"""Entry point of the worker process (started with `spawn`): load, announce, run cycles."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tinker_server.logs import configure_logging
from tinker_server.ops import Cycle, CycleReport, WorkerOptions
from tinker_server.worker.attention_kernels import avoid_per_shape_plans
from tinker_server.worker.host_memory import keep_freed_memory

if TYPE_CHECKING:
    from tinker_server.worker.engine import Engine


@dataclass(frozen=True)
class WorkerStartupError:
    """Sent instead of ModelInfo when the base model cannot be loaded."""

    message: str


def prepare_process() -> torch.device:
    """The worker's device, with the process set up to run the model there: freed host memory kept
    for reuse, attention kernels that build nothing per shape."""
    keep_freed_memory()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    avoid_per_shape_plans(device)
    return device


def build_engine(base_model: str | None, options: WorkerOptions, device: torch.device) -> Engine:
    """The base model in the options' dtype on `device`, checked and ready for adapters."""
    # Imported here so the parent process never loads torch model code for the worker.
    from tinker_server.worker.engine import Engine
    from tinker_server.worker.models import check_output_logits, load_base_model, resolve_dtype
    from tinker_server.worker.passes import checkpoint_decoder_layers
    from tinker_server.worker.residency import ResidencyLimits

    loaded = load_base_model(base_model, resolve_dtype(options.dtype, device))
    if options.activation_checkpointing:
        checkpoint_decoder_layers(loaded.model)
    limits = ResidencyLimits(
        options.max_resident_runs,
        options.max_resident_snapshot_bytes,
        options.max_host_adapter_bytes,
        options.adapter_idle_seconds,
    )
    spill_dir = Path(options.spill_dir) if options.spill_dir else None
    if spill_dir is not None:
        shutil.rmtree(spill_dir, ignore_errors=True)  # a previous worker's offloads died with it
    engine = Engine(loaded, device, options.max_tokens_per_pass, limits, spill_dir, options.kv_cache_bytes)
    check_output_logits(engine.model)
    return engine


def worker_main(
    conn: Connection,
    base_model: str | None,
    options: WorkerOptions,
    log_level: int,
    log_format: str,
    work_waiting: Event,
) -> None:
    # Ctrl-C reaches the whole process group; the server decides when the worker stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_logging(log_level, log_format)
    device = prepare_process()
    try:
        engine = build_engine(base_model, options, device)
    except Exception as error:  # reported to the server, which exits with the reason
        conn.send(WorkerStartupError(f"{type(error).__name__}: {error}"))
        return
    conn.send(engine.info())
    logging.getLogger(__name__).info("worker ready on %s, base weights in %s", device, engine.model.dtype)
    while True:
        try:
            message: Cycle | None = conn.recv()
        except EOFError:  # the server went away
            break
        if message is None:
            break
        outcomes = engine.run_cycle(message, options.decode_chunk_seconds, interrupt=work_waiting.is_set)
        conn.send(CycleReport(outcomes, engine.residency.stats()))
    engine.finish_writes()
    _exit_at_once()


def _exit_at_once() -> None:
    """Ends the process without the interpreter's teardown: with torch and transformers loaded,
    freeing every module's objects one by one takes a second or more, and nothing needs it (the
    worker holds no files open for writing, and its logs are flushed here)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

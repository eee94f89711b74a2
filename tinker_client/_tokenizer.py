"""Rebuilds a base model's tokenizer from the files the server sends (no hub download)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def tokenizer_from_files(files: dict[str, bytes]) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer  # heavy: only when a tokenizer is asked for

    with tempfile.TemporaryDirectory() as directory:
        for name, content in files.items():
            if Path(name).name != name:  # only plain file names, never paths
                raise ValueError(f"tokenizer file name {name!r} is not a plain file name")
            (Path(directory) / name).write_bytes(content)
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)

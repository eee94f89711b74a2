"""age encryption (age-encryption.org, with pyrage) of the files of an external checkpoint,
to the recipients its save named: native `age1...` keys or SSH public keys."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pyrage

AGE_SUFFIX = ".age"
MAX_RECIPIENTS = 10


def parse_recipients(texts: Sequence[str]) -> list[object]:
    """pyrage recipients of `texts`; else ValueError, its message the index of the first that is
    none and why (`[2]: ...`), or `: ` and why for too many."""
    if len(texts) > MAX_RECIPIENTS:
        raise ValueError(f": {len(texts)} recipients; at most {MAX_RECIPIENTS}")
    recipients = []
    for index, text in enumerate(texts):
        kind = pyrage.ssh if text.startswith(("ssh-", "ecdsa-")) else pyrage.x25519
        try:
            recipients.append(kind.Recipient.from_str(text.strip()))
        except pyrage.RecipientError as error:
            raise ValueError(f"[{index}]: {text[:40]!r} is not an age or SSH public key ({error})") from error
    return recipients


def encrypt_files(directory: Path, recipients: Sequence[str]) -> None:
    """Replaces every file in `directory` with its encryption to `recipients`, named with AGE_SUFFIX."""
    parsed = parse_recipients(recipients)
    for path in sorted(directory.iterdir()):
        pyrage.encrypt_file(str(path), str(path.with_name(path.name + AGE_SUFFIX)), parsed)
        path.unlink()

"""What the export modules share: their error type, the runner signature, atomic file writes."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from wholebody.atomic import atomic_write

# A runner maps a batch of windows [b,1,96,96,96] float32 to logits [b,105,96,96,96] float32.
Runner = Callable[[np.ndarray], np.ndarray]


class ExportError(RuntimeError):
    """An artifact could not be made or does not meet the serving contract; the message says why."""


def write_atomically(path: Path, data: bytes | str) -> Path:
    """Write `data` to `path` through a hidden temporary file and a rename (`wholebody.atomic`): readers never
    see half a file, two writers never share a temporary, and the file's mode comes from the umask.

    Raises:
        OSError: the folder of `path` is missing or not writable.
    """
    path = Path(path)
    atomic_write(path, lambda stream: stream.write(data.encode() if isinstance(data, str) else data))
    return path


def md5sum(path: Path) -> str:
    """Hex md5 of a file (the bundle's metadata identifies its checkpoints by md5)."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()

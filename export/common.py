"""What the export modules share: their error type, the runner signature, md5 sums."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np


# A runner maps a batch of windows [b,1,96,96,96] float32 to logits [b,105,96,96,96] float32.
Runner = Callable[[np.ndarray], np.ndarray]


class ExportError(RuntimeError):
    """An artifact could not be made or does not meet the serving contract; the message says why."""


def md5sum(path: Path) -> str:
    """Hex md5 of a file (the bundle's metadata identifies its checkpoints by md5)."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()

"""Process-level memory settings for the model stubs."""

from __future__ import annotations

import os
from pathlib import Path

THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def enable_huge_pages(setting: Path = THP_SETTING) -> bool:
    """Ask PyTorch to back its large CPU tensors (>= 2 MB) with transparent huge pages.

    A SegResNet forward on a 96^3 window allocates ~0.7 GB of activations that the C library maps
    fresh and unmaps again for every window; with 4 KiB pages a forward page-faults ~530,000 times.
    PyTorch's `THP_MEM_ALLOC_ENABLE` makes those allocations 2 MiB-aligned and
    `madvise(MADV_HUGEPAGE)`: ~18,000 faults, 2.89 -> 2.33 s per window on 2 CPU cores
    (`python -m perf.network_forward`), and unlike keeping the freed memory mapped it costs no
    resident memory.

    PyTorch reads the variable once, at its first large allocation: call this before building
    models. Returns False (and changes nothing) where the kernel has transparent huge pages off.
    """
    try:
        mode = setting.read_text()
    except OSError:
        return False
    if "[never]" in mode:
        return False
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
    return True

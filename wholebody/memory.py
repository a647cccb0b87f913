"""Process-level memory settings for the model stubs."""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Sequence
from pathlib import Path

import torch

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


MADV_REMOVE = 9  # <sys/mman.h>, Linux: free the backing pages of a shared mapping (a hole in its tmpfs file)


def release_shared_pages(tensor: torch.Tensor, keep: Sequence[torch.Tensor] = ()) -> int:
    """Give back the memory pages of a CPU tensor that lives in a shared-memory mapping; returns bytes freed.

    The Python backend copies every request input into its stub's shared-memory pool, which keeps
    its pages when the tensor is freed: a 512x512x397 float32 CT stays resident there (0.42 GB)
    through the rest of the request, beside the client's own region. `madvise(MADV_REMOVE)` frees
    the whole pages inside the tensor's bytes (the allocator's headers before and after them are
    not touched); the tensor then reads as zeros, so call this only when the tensor is no longer
    needed. Nothing is freed (0) for a tensor overlapping one of `keep` (an output that is a view of
    it), for a non-CPU or non-contiguous tensor, or where the kernel refuses (private memory: EINVAL).
    """
    if tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor.numel() == 0:
        return 0
    start, end = tensor.data_ptr(), tensor.data_ptr() + tensor.numel() * tensor.element_size()
    for other in keep:
        other_start = other.data_ptr()
        if other.device.type == "cpu" and other_start < end and start < other_start + other.numel() * other.element_size():
            return 0
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page
    if last <= first:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    if libc.madvise(first, last - first, MADV_REMOVE) != 0:
        return 0
    return last - first

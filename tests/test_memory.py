"""Giving a finished input's shared-memory pages back (wholebody.memory.release_shared_pages)."""

from __future__ import annotations

import mmap
from multiprocessing import shared_memory

import numpy as np
import torch

from wholebody.memory import release_shared_pages


def test_shared_pages_inside_a_tensor_are_freed_and_its_neighbours_kept() -> None:
    region = shared_memory.SharedMemory(create=True, size=64 * mmap.PAGESIZE)
    try:
        offset = 100  # not page-aligned, as a tensor after the pool allocator's header
        array = np.ndarray((40 * mmap.PAGESIZE // 4,), np.float32, region.buf, offset=offset)
        array[:] = 1.0
        region.buf[:offset] = b"\x07" * offset  # "the allocator's header" just before the tensor
        tensor = torch.from_numpy(array)
        assert release_shared_pages(tensor, keep=[tensor[10:20]]) == 0  # an output viewing it: kept
        assert float(tensor.sum()) == tensor.numel()
        freed = release_shared_pages(tensor)
        assert freed == 39 * mmap.PAGESIZE  # the whole pages inside it
        assert bytes(region.buf[:offset]) == b"\x07" * offset and tensor[0] == 1.0 and tensor[-1] == 1.0
        assert tensor[mmap.PAGESIZE].item() == 0.0  # reads as zeros afterwards: only for finished inputs
        del tensor, array
    finally:
        region.close()
        region.unlink()


def test_private_memory_is_left_alone() -> None:
    tensor = torch.ones(4 * mmap.PAGESIZE)
    assert release_shared_pages(tensor) == 0 and float(tensor.sum()) == tensor.numel()
    assert release_shared_pages(torch.ones(4 * mmap.PAGESIZE)[::2]) == 0  # not contiguous

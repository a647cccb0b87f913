"""Sliding-window inference straight to a label map, in bounded memory.

MONAI's `sliding_window_inference` keeps the blended logits of the whole volume (105 channels: 13.7 GB
in fp32 for a 287x287x397 volume) and the bundle then takes the argmax. This module places the same
windows (MONAI's scan interval and `dense_patch_slices`), weights them with the same gaussian
importance map and pads the same way, but visits them in order along the volume's longest axis and
keeps only a ring of one window's depth of blended logits: slices that no later window touches are
arg-maxed to uint8 and their ring slices reused. Peak memory is 105 x roi x (the two other axes)
instead of the whole volume, and the labels equal MONAI's (the division by the summed weights,
which this skips, is positive per voxel and does not change the argmax).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map, dense_patch_slices, get_valid_patch_size
from monai.inferers.utils import _get_scan_interval

from wholebody.validation import RequestCancelled


# The `blend_dtype` config parameter's values.
BLEND_DTYPES = {"float32": torch.float32, "float16": torch.float16}


class Predictor(Protocol):
    def __call__(self, windows: torch.Tensor) -> torch.Tensor:
        """[B, 1, *roi] float32 -> [B, C, *roi] logits (any float dtype, any device)."""
        ...


def sliding_window_label_map(
    image: torch.Tensor,
    predictor: Predictor | Callable[[torch.Tensor], torch.Tensor],
    roi_size: Sequence[int] = (96, 96, 96),
    sw_batch_size: int = 1,
    overlap: float = 0.25,
    mode: str = "gaussian",
    sigma_scale: float = 0.125,
    padding_mode: str = "replicate",
    progress: Callable[[int, int], None] | None = None,
    blend_dtype: torch.dtype = torch.float32,
    should_stop: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Label map of a [X, Y, Z] volume: argmax over the blended logits of overlapping windows.

    Args:
        image: the preprocessed volume, on the device the windows should be cut on.
        predictor: maps a batch of windows [B, 1, *roi_size] to logits [B, C, *roi_size].
        roi_size, sw_batch_size, overlap, mode, sigma_scale, padding_mode: as MONAI's
            `sliding_window_inference` (the bundle: 96^3, 1, 0.25, gaussian, 0.125, replicate).
        progress: called as progress(done, total) after each batch of windows.
        blend_dtype: dtype of the ring of blended logits. float32 is the bundle's; float16 halves
            the ring (105 x 96 x 287 x 287: 3.3 -> 1.7 GB at 1.5 mm) and the traffic of blending
            fp16 logits, at the cost of near-tied voxels flipping (measured in docs/performance.md).
        should_stop: asked before each batch of windows (in Triton: the request's `is_cancelled`);
            True stops the work there: at most one batch is computed after the request is cancelled.

    Returns:
        uint8 [X, Y, Z] labels on `image`'s device.

    Raises:
        RequestCancelled: `should_stop()` answered True (the message says after how many windows).
    """
    if blend_dtype not in BLEND_DTYPES.values():
        raise ValueError(f"blend_dtype must be one of {list(BLEND_DTYPES.values())}, got {blend_dtype}")
    if image.ndim != 3:
        raise ValueError(f"image must be [X, Y, Z], got shape {list(image.shape)}")
    roi = tuple(int(r) for r in roi_size)
    original = tuple(int(s) for s in image.shape)
    # Pad axes shorter than the window symmetrically, as MONAI does (F.pad lists the last axis first).
    pad: list[int] = []
    for axis in reversed(range(3)):
        diff = max(roi[axis] - original[axis], 0)
        pad += [diff // 2, diff - diff // 2]
    volume = image[None, None].to(torch.float32)
    if any(pad):
        volume = F.pad(volume, pad=pad, mode=padding_mode)
    size = tuple(int(s) for s in volume.shape[2:])
    interval = _get_scan_interval(size, roi, 3, (overlap,) * 3)
    windows = dense_patch_slices(size, roi, interval)
    weight = compute_importance_map(
        get_valid_patch_size(size, roi), mode=mode, sigma_scale=sigma_scale, device=volume.device, dtype=torch.float32
    )[None].to(blend_dtype)

    # Visit windows in order of their start along the longest axis. The ring holds roi[axis] slices
    # of blended logits; volume slice i lives at ring slice i % roi[axis], so nothing is ever moved.
    axis = max(range(3), key=lambda a: size[a])
    windows = sorted(windows, key=lambda w: w[axis].start)
    depth = roi[axis]
    ring_shape = list(size)
    ring_shape[axis] = depth
    ring: torch.Tensor | None = None  # [C, *ring_shape], allocated when the class count is known
    base = 0  # first volume slice not yet arg-maxed
    labels = torch.empty(size, dtype=torch.uint8, device=volume.device)

    def along(start: int, stop: int) -> tuple[slice, ...]:
        index = [slice(None)] * 3
        index[axis] = slice(start, stop)
        return tuple(index)

    def ring_pieces(start: int, stop: int) -> list[tuple[int, int, int]]:
        """(offset from start, length, ring slice) of the at most two runs [start, stop) occupies."""
        first = min(stop - start, depth - start % depth)
        pieces = [(0, first, start % depth)]
        if stop - start > first:
            pieces.append((first, stop - start - first, 0))
        return pieces

    def finalize(stop: int) -> None:
        """Arg-max volume slices [base, stop), which no later window touches, and clear their ring slices."""
        nonlocal base
        if ring is None:
            return
        for offset, length, at in ring_pieces(base, stop):
            block = ring[(slice(None), *along(at, at + length))]
            labels[along(base + offset, base + offset + length)] = block.argmax(dim=0).to(torch.uint8)
            block.zero_()
        base = max(base, stop)

    def blend(batch: Sequence[tuple[slice, ...]], logits: torch.Tensor) -> None:
        nonlocal ring
        if logits.shape[0] != len(batch) or tuple(logits.shape[2:]) != roi:
            raise ValueError(f"predictor returned {list(logits.shape)} for {len(batch)} windows of {list(roi)}")
        if ring is None:
            ring = torch.zeros((logits.shape[1], *ring_shape), dtype=blend_dtype, device=volume.device)
        for window, window_logits in zip(batch, logits):
            start = window[axis].start
            finalize(start)  # windows tile the volume: [base, start + depth) always fits the ring
            window_logits = window_logits.to(device=ring.device, dtype=ring.dtype)
            for offset, length, at in ring_pieces(start, start + depth):
                target = list(window)
                target[axis] = slice(at, at + length)
                part = (slice(None), *along(offset, offset + length))
                ring[(slice(None), *target)].addcmul_(window_logits[part], weight[part])

    total = len(windows)
    for first in range(0, total, sw_batch_size):
        if should_stop is not None and should_stop():
            raise RequestCancelled(f"cancelled after {first}/{total} windows")
        batch = windows[first : first + sw_batch_size]
        # One batch's logits at a time: they are released here, before the next call, so that a
        # predictor backed by a server never holds two batches (371 MB each per 96^3 window).
        blend(batch, predictor(torch.cat([volume[(slice(None), slice(None), *w)] for w in batch])))
        if progress is not None:
            progress(min(first + sw_batch_size, total), total)
    finalize(size[axis])
    # Crop the padding away again.
    crop = tuple(slice(pad[2 * (2 - a)], pad[2 * (2 - a)] + original[a]) for a in range(3))
    return labels[crop].contiguous()

"""Per-structure Dice and normalised surface Dice of a predicted label map against ground truth, by MONAI.

The numbers are MONAI's (`monai.metrics.compute_dice`, `monai.metrics.compute_surface_dice`), computed
per structure on binary masks cropped to the union of both masks' bounding boxes plus one voxel of
background (Dice and the surface are unchanged by the crop: MONAI itself crops to that box before
finding edges; tests/test_evaluation.py checks equality with MONAI on whole arrays). Cropping keeps a
whole-body map cheap: one-hot encoding 105 classes of a 512x512x397 map would take ~43 GB.

Structures absent from one or both sides are decided here, before MONAI is asked (MONAI would return NaN
or warn), as TotalSegmentator's own evaluation (resources/evaluate.py) and the model card do, except
that a structure only predicted counts as an error:

| truth | prediction | case        | Dice | NSD | in means |
|-------|------------|-------------|------|-----|----------|
| yes   | yes        | `both`      | MONAI's | MONAI's | yes |
| yes   | no         | `missed`    | 0    | 0   | yes |
| no    | yes        | `spurious`  | 0    | 0   | yes |
| no    | no         | `absent`    | NaN  | NaN | no, counted |

NSD is the normalised surface Dice at `tolerance_mm` (default 3 mm, TotalSegmentator's published
"surface_dice_3"): the share of both surfaces within the tolerance of the other, with the voxel spacing
of the label maps.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

CASES = ("both", "missed", "spurious", "absent")
DEFAULT_TOLERANCE_MM = 3.0
# torch intra-op threads while MONAI scores: its per-structure work is many small tensor operations, where more
# threads only spin. Measured (45 structures of a 40x36x30 map, 2-core AMD EPYC, load average ~20):
# 16.6 s with torch's default 2 threads, 1.4 s with 1.
TORCH_THREADS = 1


@dataclass(frozen=True)
class StructureScore:
    """One structure of one scan. Voxel counts are of the label value on each side."""

    label: int
    case: str  # one of CASES
    dice: float  # NaN when `absent`
    nsd: float  # normalised surface Dice at the tolerance; NaN when `absent`
    truth_voxels: int
    predicted_voxels: int


def _boxes(label_map: np.ndarray, top: int) -> list[tuple[slice, ...] | None]:
    from scipy import ndimage

    return list(ndimage.find_objects(label_map, max_label=top))


def _union(a: tuple[slice, ...] | None, b: tuple[slice, ...] | None, shape: Sequence[int]) -> tuple[slice, ...]:
    boxes = [x for x in (a, b) if x is not None]
    return tuple(slice(max(0, min(x[k].start for x in boxes) - 1), min(shape[k], max(x[k].stop for x in boxes) + 1))
                 for k in range(len(shape)))


def monai_scores(predicted: np.ndarray, truth: np.ndarray, spacing: Sequence[float],
                 tolerance_mm: float = DEFAULT_TOLERANCE_MM) -> tuple[float, float]:
    """(Dice, NSD) of two non-empty binary masks of one shape, as MONAI computes them.

    Args:
        predicted, truth: [X, Y, Z] bool (or 0/1) arrays.
        spacing: voxel size along X, Y, Z in mm.
    """
    import torch
    from monai.metrics import compute_dice, compute_surface_dice

    p = torch.from_numpy(np.ascontiguousarray(predicted, dtype=bool))[None, None]
    t = torch.from_numpy(np.ascontiguousarray(truth, dtype=bool))[None, None]
    dice = compute_dice(p.float(), t.float(), include_background=True)
    with warnings.catch_warnings():  # MONAI 1.6 calls its own deprecated get_mask_edges argument; nothing to fix here
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        nsd = compute_surface_dice(p, t, class_thresholds=[tolerance_mm], include_background=True,
                                   spacing=[float(s) for s in spacing])
    return float(dice.item()), float(nsd.item())


def score_label_maps(predicted: np.ndarray, truth: np.ndarray, spacing: Sequence[float], labels: Sequence[int],
                     tolerance_mm: float = DEFAULT_TOLERANCE_MM) -> list[StructureScore]:
    """Scores of every label in `labels` (values > 0) of two label maps on one grid.

    Args:
        predicted, truth: [X, Y, Z] uint8 label maps of one shape (the bundle's label values).
        spacing: voxel size along X, Y, Z in mm (e.g. `nibabel` header zooms).
        labels: the label values to score.
        tolerance_mm: the NSD tolerance.
    Raises:
        ValueError: the shapes differ or a map is not uint8.
    """
    if predicted.shape != truth.shape:
        raise ValueError(f"predicted {list(predicted.shape)} and ground truth {list(truth.shape)} differ in shape")
    if predicted.dtype != np.uint8 or truth.dtype != np.uint8:
        raise ValueError(f"label maps must be uint8, got {predicted.dtype} and {truth.dtype}")
    top = max(labels, default=0)
    p_boxes, t_boxes = _boxes(predicted, top), _boxes(truth, top)
    scores = []
    with _torch_threads(TORCH_THREADS):
        for label in labels:
            scores.append(_score(predicted, truth, label, p_boxes[label - 1], t_boxes[label - 1], spacing,
                                 tolerance_mm))
    return scores


@contextlib.contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to `count` inside (process-wide: the evaluation's only torch user)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _score(predicted: np.ndarray, truth: np.ndarray, label: int, p_box: tuple[slice, ...] | None,
           t_box: tuple[slice, ...] | None, spacing: Sequence[float], tolerance_mm: float) -> StructureScore:
    if p_box is None and t_box is None:
        return StructureScore(label, "absent", math.nan, math.nan, 0, 0)
    box = _union(p_box, t_box, predicted.shape)
    p, t = predicted[box] == label, truth[box] == label
    n_p, n_t = int(p.sum()), int(t.sum())
    if n_p and n_t:
        dice, nsd = monai_scores(p, t, spacing, tolerance_mm)
        return StructureScore(label, "both", dice, nsd, n_t, n_p)
    return StructureScore(label, "missed" if n_t else "spurious", 0.0, 0.0, n_t, n_p)

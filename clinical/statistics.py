"""Per-structure statistics of a label map and the CT it was made from, and structure subsets.

stats = structure_statistics(label_map, ct, affine, names)   # one row per structure present
write_statistics(stats, "ct_statistics.json", "ct_statistics.csv")
label_map = keep_structures(label_map, names, ["liver", "spleen"])   # --roi-subset
"""

from __future__ import annotations

import csv
import difflib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np

from wholebody.atomic import atomic_path


@dataclass(frozen=True)
class StructureStatistics:
    """One structure's size and intensities.

    label: its label value; name: its name; voxels: voxel count; volume_ml: voxels x the voxel volume
    of the affine (|det| of its 3x3 part, mm^3) / 1000; mean_hu, std_hu (population, ddof=0), min_hu,
    max_hu: the CT's values inside it, HU.
    """

    label: int
    name: str
    voxels: int
    volume_ml: float
    mean_hu: float
    std_hu: float
    min_hu: float
    max_hu: float


def voxel_volume_ml(affine: np.ndarray) -> float:
    """Volume of one voxel of a grid with this [4, 4] voxel -> world (mm) affine, in mL."""
    return float(abs(np.linalg.det(np.asarray(affine, np.float64)[:3, :3]))) / 1000.0


def _slabs(labels: np.ndarray, values: np.ndarray, voxels: int = 1 << 22) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The labelled voxels (label > 0) slab by slab along the first axis: (labels as intp, HU float64)."""
    plane = int(np.prod(labels.shape[1:], dtype=np.int64)) or 1
    step = max(1, voxels // plane)
    for start in range(0, labels.shape[0], step):
        flat = labels[start : start + step].reshape(-1).astype(np.intp)
        inside = flat > 0
        yield flat[inside], values[start : start + step].reshape(-1)[inside].astype(np.float64)


def voxel_counts(label_map: np.ndarray, slab_voxels: int = 1 << 22) -> np.ndarray:
    """Voxels per label value of a uint8 label map: [256] int64, index = label.

    Counted slab by slab along the last axis (contiguous in NIfTI's Fortran order), so the temporary
    memory stays at ~9 bytes x `slab_voxels` whatever the volume (`np.bincount` of the whole map would
    take 8 bytes per voxel: 2.5 GB for 512x512x1200). Raises ValueError for a map that is not uint8.
    """
    labels = np.asarray(label_map)
    if labels.dtype != np.uint8:
        raise ValueError(f"label map must be uint8, got {labels.dtype}")
    counts = np.zeros(256, np.int64)
    if labels.ndim == 0 or not labels.size:
        return counts
    plane = int(np.prod(labels.shape[:-1], dtype=np.int64)) or 1
    step = max(1, slab_voxels // plane)
    for start in range(0, labels.shape[-1], step):
        counts += np.bincount(labels[..., start : start + step].ravel(order="K"), minlength=256)
    return counts


def structure_statistics(
    label_map: np.ndarray, ct: np.ndarray, affine: np.ndarray, names: Sequence[str], slab_voxels: int = 1 << 22
) -> list[StructureStatistics]:
    """Statistics of every structure present (label > 0) in `label_map`, in label order.

    Args:
        label_map: [X, Y, Z] integer labels.
        ct: [X, Y, Z] the CT in HU on the same grid (any real dtype; computed in float64).
        affine: [4, 4] voxel -> world (mm) of that grid.
        names: structure names indexed by label value (entry 0 = background).
        slab_voxels: voxels processed at once (bounds the temporary memory, ~40 bytes per voxel).

    Raises:
        ValueError: the shapes differ, a label is negative, or a label has no name.
    """
    labels = np.asarray(label_map)
    values = np.asarray(ct)
    if labels.shape != values.shape:
        raise ValueError(f"label map {list(labels.shape)} and CT {list(values.shape)} must have the same shape")
    if labels.size and int(labels.min()) < 0:
        raise ValueError("label map has negative labels")
    size = int(labels.max(initial=0)) + 1
    count = np.zeros(size, np.int64)
    total = np.zeros(size)
    low = np.full(size, np.inf)
    high = np.full(size, -np.inf)
    for flat, hu in _slabs(labels, values, slab_voxels):  # pass 1: counts, sums, extremes
        count += np.bincount(flat, minlength=size)
        total += np.bincount(flat, weights=hu, minlength=size)
        np.minimum.at(low, flat, hu)
        np.maximum.at(high, flat, hu)
    present = np.flatnonzero(count)
    if not present.size:
        return []
    if int(present[-1]) >= len(names):
        raise ValueError(f"label {int(present[-1])} has no name: {len(names)} names given (index = label value)")
    mean = np.divide(total, count, out=np.zeros(size), where=count > 0)
    squared = np.zeros(size)
    for flat, hu in _slabs(labels, values, slab_voxels):  # pass 2: squared deviations (numpy's two-pass variance)
        squared += np.bincount(flat, weights=(hu - mean[flat]) ** 2, minlength=size)
    voxel_ml = voxel_volume_ml(affine)
    return [
        StructureStatistics(
            label=int(i),
            name=str(names[i]),
            voxels=int(count[i]),
            volume_ml=float(count[i] * voxel_ml),
            mean_hu=float(mean[i]),
            std_hu=float(np.sqrt(squared[i] / count[i])),
            min_hu=float(low[i]),
            max_hu=float(high[i]),
        )
        for i in present
    ]


def write_statistics(
    statistics: Sequence[StructureStatistics],
    json_path: str | os.PathLike[str] | None = None,
    csv_path: str | os.PathLike[str] | None = None,
) -> None:
    """Write the statistics as JSON ({name: {label, voxels, volume_ml, ...}}) and/or CSV (one row each).

    Each file is written under a temporary name and renamed when complete.
    """
    if json_path is not None:
        table = {row.name: {k: v for k, v in asdict(row).items() if k != "name"} for row in statistics}
        with atomic_path(json_path) as tmp:
            tmp.write_text(json.dumps(table, indent=2) + "\n")
    if csv_path is not None:
        with atomic_path(csv_path) as tmp, tmp.open("w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=[f.name for f in fields(StructureStatistics)])
            writer.writeheader()
            writer.writerows(asdict(row) for row in statistics)


def structure_labels(requested: Sequence[str], names: Sequence[str]) -> list[int]:
    """Label values of the structures named in `requested` (case-insensitive, surrounding spaces ignored).

    Args:
        requested: structure names, e.g. from `--roi-subset liver spleen`.
        names: structure names indexed by label value (entry 0 = background, not selectable).

    Raises:
        ValueError: `requested` names nothing (empty or blank: a subset that would silently keep no
            structure), or some names are unknown; the message lists, for each, the closest valid names.
    """
    if not any(name.strip() for name in requested):
        raise ValueError("names no structure; give names such as liver,spleen, or leave it out for all structures")
    index = {name.strip().lower(): label for label, name in enumerate(names) if label > 0}
    unknown = [name for name in requested if name.strip().lower() not in index]
    if unknown:
        valid = [name for label, name in enumerate(names) if label > 0]
        lowered = {name.lower(): name for name in valid}
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name.strip().lower(), list(lowered), n=5, cutoff=0.5)
            hints.append(f"'{name}' (closest: {', '.join(lowered[c] for c in close)})" if close else f"'{name}'")
        raise ValueError(
            f"unknown structure name{'s' if len(unknown) > 1 else ''}: {'; '.join(hints)}; "
            f"{len(valid)} valid names, e.g. {', '.join(valid[:5])}"
        )
    return sorted({index[name.strip().lower()] for name in requested})


def keep_structures(label_map: np.ndarray, names: Sequence[str], keep: Sequence[str]) -> np.ndarray:
    """A copy of `label_map` with only the structures named in `keep`; every other label set to 0.

    Label values are kept (a kept liver stays the liver's label). Raises ValueError as
    `structure_labels` for unknown names.
    """
    labels = np.asarray(label_map)
    wanted = np.zeros(max(int(labels.max(initial=0)) + 1, len(names)), dtype=bool)
    wanted[structure_labels(keep, names)] = True
    return np.where(wanted[labels], labels, 0).astype(labels.dtype, copy=False)

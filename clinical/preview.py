"""A quick-look PNG: axial, coronal and sagittal slices of the CT with the labels overlaid.

Drawn with matplotlib's object-oriented `Figure` (rendered by its Agg canvas: no display, no
pyplot state, the caller's backend untouched): it places three panels of different
physical sizes side by side at their true aspect (`imshow` extents in mm), and writes titles and
orientation letters without any font handling of our own.

Slices go through the centre of the labelled voxels (the volume's centre when there are none),
after reorienting the volume to the closest RAS axes (nibabel), and are shown in radiological
convention: the patient's right on the image's left, anterior up (axial), superior up (coronal,
sagittal), anterior on the left (sagittal).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from matplotlib.figure import Figure

from wholebody.atomic import atomic_path

DEFAULT_WINDOW_HU = (-400.0, 600.0)


def _ras(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`volume` on the closest RAS axes and its voxel spacing (mm) along them."""
    ornt = nib.orientations.io_orientation(affine)
    reoriented = nib.orientations.apply_orientation(volume, ornt)
    new_affine = affine @ nib.orientations.inv_ornt_aff(ornt, volume.shape)
    return reoriented, np.sqrt((new_affine[:3, :3] ** 2).sum(axis=0))


def _display(plane: np.ndarray) -> np.ndarray:
    """A [u, v] slice of a RAS volume -> image rows/columns: v decreasing down, u decreasing right."""
    return plane.T[::-1, ::-1]


@dataclass(frozen=True)
class Panel:
    """One slice ready to draw: rows top to bottom, columns left to right as shown.

    ct: [rows, columns] HU; labels: [rows, columns]; size_mm: (width, height) of the slice in mm;
    edges: the patient directions at the (left, right, top, bottom) edges; index: where it was cut.
    """

    name: str
    ct: np.ndarray
    labels: np.ndarray
    size_mm: tuple[float, float]
    edges: str
    index: str


def orthogonal_slices(ct: np.ndarray, affine: np.ndarray, label_map: np.ndarray) -> list[Panel]:
    """Axial, coronal and sagittal slices through the labels' centre, in radiological display order.

    Args:
        ct: [X, Y, Z] CT (HU); label_map: [X, Y, Z] labels on the same grid; affine: [4, 4]
            voxel -> RAS (mm). The volume is put on its closest RAS axes first (an oblique scan is
            shown along its own slices).

    Raises:
        ValueError: the two volumes are not 3-D of one shape.
    """
    image, labels = np.asarray(ct), np.asarray(label_map)
    if image.ndim != 3 or image.shape != labels.shape:
        raise ValueError(f"CT {list(image.shape)} and label map {list(labels.shape)} must be 3-D of one shape")
    matrix = np.asarray(affine, np.float64)
    image, spacing = _ras(image, matrix)
    labels, _ = _ras(labels, matrix)
    foreground = np.argwhere(labels > 0)
    centre = foreground.mean(axis=0) if foreground.size else (np.asarray(labels.shape) - 1) / 2
    i, j, k = (int(round(c)) for c in centre)
    sx, sy, sz = (float(s) for s in spacing)
    nx, ny, nz = labels.shape
    return [
        Panel("axial", _display(image[:, :, k]), _display(labels[:, :, k]), (nx * sx, ny * sy), "RLAP", f"z = {k}"),
        Panel("coronal", _display(image[:, j, :]), _display(labels[:, j, :]), (nx * sx, nz * sz), "RLSI", f"y = {j}"),
        Panel("sagittal", _display(image[i, :, :]), _display(labels[i, :, :]), (ny * sy, nz * sz), "APSI", f"x = {i}"),
    ]


def write_preview(
    path: str | os.PathLike[str],
    ct: np.ndarray,
    affine: np.ndarray,
    label_map: np.ndarray,
    colors: Sequence[Sequence[int]],
    window_hu: tuple[float, float] = DEFAULT_WINDOW_HU,
    opacity: float = 0.5,
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """Write a PNG of three orthogonal CT slices with the labels overlaid in their colours.

    Args:
        path: the PNG to write (written under a temporary name, renamed when complete).
        ct: [X, Y, Z] CT in HU.
        affine: [4, 4] voxel -> RAS world (mm) of the CT's grid.
        label_map: [X, Y, Z] integer labels on the same grid (0 = background, not drawn).
        colors: display colour (r, g, b in 0..255) per label value (entry 0 unused).
        window_hu: the grey-level window (HU): values below are black, above white.
        opacity: of the label colours over the CT, 0..1.
        title: a line above the panels (e.g. the file name).
        dpi: resolution of the PNG (the figure is 15 x 5.5 inches).

    Raises:
        ValueError: CT and label map differ in shape or are not 3-D, or a label shown has no colour.
    """
    panels = orthogonal_slices(ct, affine, label_map)
    palette = np.asarray(colors, np.float64).reshape(-1, 3) / 255.0
    top = max(int(panel.labels.max(initial=0)) for panel in panels)
    if top >= len(palette):
        raise ValueError(f"label {top} has no colour: {len(palette)} colours given (index = label value)")
    low, high = window_hu
    figure = Figure(figsize=(15, 5.5), dpi=dpi, facecolor="black")
    for ax, panel in zip(figure.subplots(1, 3), panels):
        width, height = panel.size_mm
        extent = (0.0, width, 0.0, height)
        ax.imshow(panel.ct, cmap="gray", vmin=low, vmax=high, extent=extent, interpolation="nearest")
        overlay = np.zeros((*panel.labels.shape, 4))
        overlay[..., :3] = palette[panel.labels]
        overlay[..., 3] = np.where(panel.labels > 0, opacity, 0.0)
        ax.imshow(overlay, extent=extent, interpolation="nearest")
        ax.set_title(f"{panel.name} ({panel.index})", color="white")
        ax.set_axis_off()
        style = {"color": "yellow", "fontsize": 11, "ha": "center", "va": "center"}
        left, right, up, down = panel.edges
        ax.text(width * 0.03, height / 2, left, **style)
        ax.text(width * 0.97, height / 2, right, **style)
        ax.text(width / 2, height * 0.97, up, **style)
        ax.text(width / 2, height * 0.03, down, **style)
    if title:
        figure.suptitle(title, color="white")
    figure.text(0.99, 0.01, f"window {low:g}..{high:g} HU", color="grey", ha="right", va="bottom", fontsize=8)
    target = Path(path)
    with atomic_path(target) as tmp:
        figure.savefig(tmp, format="png", facecolor="black")
    return target

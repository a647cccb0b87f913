"""3D Slicer segmentation files (`.seg.nrrd`): a label map with named, coloured segments.

Slicer's format is an NRRD file (written and read here with pynrrd) whose header carries, beside
`space`/`space directions`/`space origin` (LPS), one group of `Segment<i>_*` key/value fields per
segment: `_ID`, `_Name`, `_Color` (r g b in 0..1), `_LabelValue`, `_Layer`, `_Extent` (the
segment's voxel bounding box, "i0 i1 j0 j1 k0 k1") and `_Tags`, and `Segmentation_*` fields naming the
master representation (Slicer's developer guide: "Segmentation labelmap file format (.seg.nrrd)").
All segments are written into one layer (layer 0), each with its label value, so the file holds
the label map unchanged.

What a segment is, in standard codes, goes into its `_Tags` as Slicer's `TerminologyEntry` (same
guide, "TerminologyEntry tag"): seven `~`-separated parts, the context name, category, type and type
modifier (each `scheme^value^meaning`), the anatomic context name, region and region modifier; Slicer
then shows the standard names and can match the segment to its terminology lists.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nrrd
import numpy as np

from clinical.structures import Code
from wholebody.atomic import atomic_path

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])
# Slicer's terminology contexts (Modules/Loadable/Terminologies/Resources in Slicer's source): the anatomy
# list whose category "Anatomical Structure" is SCT 123037004, as in clinical/structures.json
SLICER_SEGMENTATION_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
SLICER_ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"


@dataclass(frozen=True)
class Segment:
    """One segment: its label value in the label map, name, display colour (r, g, b in 0..255) and
    Slicer `TerminologyEntry` string (None when the file has none)."""

    label: int
    name: str
    color: tuple[int, int, int]
    terminology: str | None = None


def terminology_entry(category: Code, type_: Code, modifier: Code | None = None,
                      context: str = SLICER_SEGMENTATION_CONTEXT) -> str:
    """Slicer's TerminologyEntry string for a segment coded by `category`, `type_` and `modifier`
    (e.g. SNOMED CT codes from clinical/structures.json), no anatomic region:

        <context>~SCT^123037004^Anatomical Structure~SCT^64033007^Kidney~SCT^7771000^Left
        ~Anatomic codes - DICOM master list~^^~^^

    Raises ValueError when a code holds one of the format's separators (~ ^ |).
    """
    def triplet(code: Code | None) -> str:
        if code is None:
            return "^^"
        parts = (code.scheme, code.value, code.meaning)
        if any(sep in part for part in parts for sep in "~^|"):
            raise ValueError(f"code {parts} contains '~', '^' or '|', which Slicer's TerminologyEntry cannot hold")
        return "^".join(parts)

    return "~".join([context, triplet(category), triplet(type_), triplet(modifier), SLICER_ANATOMIC_CONTEXT,
                     "^^", "^^"])


@dataclass(frozen=True)
class Segmentation:
    """A label map ([X, Y, Z] uint8), its voxel -> RAS (mm) affine, and its segments."""

    label_map: np.ndarray
    affine: np.ndarray
    segments: list[Segment]


def _extents(labels: np.ndarray) -> dict[int, str]:
    """Slicer's `_Extent` ("i0 i1 j0 j1 k0 k1", inclusive voxel bounds) of every label present, in one
    pass per axis (a label's presence per slice) instead of one mask per label."""
    bounds: dict[int, list[int]] = {}
    for axis in range(3):
        moved = np.moveaxis(labels, axis, 0)
        present = np.stack([np.bincount(moved[i].reshape(-1), minlength=256) > 0 for i in range(moved.shape[0])])
        for label in np.flatnonzero(present.any(axis=0)):
            where = np.flatnonzero(present[:, label])
            bounds.setdefault(int(label), []).extend([int(where[0]), int(where[-1])])
    return {label: " ".join(map(str, b)) for label, b in bounds.items()}


def write_seg_nrrd(
    path: str | os.PathLike[str],
    label_map: np.ndarray,
    affine: np.ndarray,
    names: Sequence[str],
    colors: Sequence[Sequence[int]],
    include_empty: bool = False,
    compression_level: int = 1,
    terminologies: Sequence[str | None] | None = None,
) -> Path:
    """Write a label map as a Slicer `.seg.nrrd`, one segment per structure present.

    Args:
        path: the file to write (written under a temporary name, renamed when complete).
        label_map: [X, Y, Z] integer labels, 0 = background, values below 256.
        affine: [4, 4] voxel -> RAS world (mm), as nibabel's; stored as LPS `space directions`.
        names, colors: per label value (entry 0 = background, unused): segment names and display
            colours (r, g, b in 0..255).
        include_empty: also list the structures absent from the label map (empty extent).
        compression_level: gzip level (1: a label map compresses nearly as well as at 9, faster).
        terminologies: per label value, its Slicer TerminologyEntry (`terminology_entry`) or None;
            written as the segment's `TerminologyEntry` tag.

    Raises:
        ValueError: a label has no name, colour or terminology entry, the label map is not 3-D, or a
            label is above 255.
    """
    labels = np.asarray(label_map)
    if labels.ndim != 3:
        raise ValueError(f"label map must be 3-D, got shape {list(labels.shape)}")
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) > 255):
        raise ValueError("label values must be within 0..255 for a .seg.nrrd label map")
    labels = labels.astype(np.uint8, copy=False)
    if len(colors) != len(names):
        raise ValueError(f"{len(names)} names but {len(colors)} colours: give one of each per label value")
    if terminologies is not None and len(terminologies) != len(names):
        raise ValueError(f"{len(names)} names but {len(terminologies)} terminology entries: give one per label value "
                         "(None where there is none)")
    extents = _extents(labels)
    present = sorted(label for label in extents if label > 0)
    if present and present[-1] >= len(names):
        raise ValueError(f"label {present[-1]} has no name: {len(names)} names given (index = label value)")
    chosen = range(1, len(names)) if include_empty else present
    matrix = LPS_FROM_RAS @ np.asarray(affine, np.float64)[:3, :3]
    header: dict[str, object] = {
        "type": "unsigned char",
        "dimension": 3,
        "space": "left-posterior-superior",
        "space directions": matrix.T,  # one row per voxel axis
        "space origin": LPS_FROM_RAS @ np.asarray(affine, np.float64)[:3, 3],
        "kinds": ["domain", "domain", "domain"],
        "encoding": "gzip",
        "Segmentation_MasterRepresentation": "Binary labelmap",
        "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
        "Segmentation_ReferenceImageExtentOffset": "0 0 0",
    }
    for i, label in enumerate(chosen):
        extent = extents.get(label, "0 -1 0 -1 0 -1")
        red, green, blue = (int(c) for c in colors[label])
        header.update(
            {
                f"Segment{i}_ID": f"Segment_{label}",
                f"Segment{i}_Name": str(names[label]),
                f"Segment{i}_NameAutoGenerated": "0",
                f"Segment{i}_Color": f"{red / 255:.6g} {green / 255:.6g} {blue / 255:.6g}",
                f"Segment{i}_ColorAutoGenerated": "0",
                f"Segment{i}_LabelValue": str(label),
                f"Segment{i}_Layer": "0",
                f"Segment{i}_Extent": extent,
            }
        )
        if terminologies is not None and terminologies[label] is not None:
            header[f"Segment{i}_Tags"] = f"TerminologyEntry:{terminologies[label]}|"
    target = Path(path)
    with atomic_path(target) as tmp:
        nrrd.write(str(tmp), labels, header, compression_level=compression_level, index_order="F")
    return target


def read_seg_nrrd(path: str | os.PathLike[str]) -> Segmentation:
    """Read a single-layer `.seg.nrrd` (as Slicer writes non-overlapping segments, and as written here).

    Returns the label map in the file's voxel order ([X, Y, Z]), its voxel -> RAS affine and the
    segments listed in the header (colours rounded to 0..255, TerminologyEntry tags as strings).

    Raises:
        ValueError: the file is not a 3-D segmentation with a known space (multi-layer files, where
            Slicer stores overlapping segments as a 4-D array, are not supported).
    """
    data, header = nrrd.read(str(path), index_order="F")
    if data.ndim != 3:
        raise ValueError(
            f"{path}: {data.ndim}-D segmentation (overlapping segments in layers) is not supported; "
            "in Slicer, make the segments non-overlapping before saving"
        )
    space = str(header.get("space", "")).lower()
    if space in ("left-posterior-superior", "lps"):
        to_ras = LPS_FROM_RAS
    elif space in ("right-anterior-superior", "ras"):
        to_ras = np.eye(3)
    else:
        raise ValueError(f"{path}: unsupported NRRD space {space!r} (expected left-posterior-superior)")
    directions = np.asarray(header["space directions"], np.float64)
    affine = np.eye(4)
    affine[:3, :3] = to_ras @ directions.T
    affine[:3, 3] = to_ras @ np.asarray(header.get("space origin", np.zeros(3)), np.float64)
    segments = []
    i = 0
    while f"Segment{i}_ID" in header or f"Segment{i}_Name" in header:
        color = [float(c) for c in str(header.get(f"Segment{i}_Color", "0.5 0.5 0.5")).split()]
        if int(header.get(f"Segment{i}_Layer", "0")) != 0:
            raise ValueError(
                f"{path}: segment {i} is on layer {header[f'Segment{i}_Layer']}; only one layer is supported"
            )
        segments.append(
            Segment(
                label=int(header.get(f"Segment{i}_LabelValue", "1")),
                name=str(header.get(f"Segment{i}_Name", header.get(f"Segment{i}_ID"))),
                color=(round(color[0] * 255), round(color[1] * 255), round(color[2] * 255)),
                terminology=_tag(str(header.get(f"Segment{i}_Tags", "")), "TerminologyEntry"),
            )
        )
        i += 1
    return Segmentation(label_map=np.asarray(data), affine=affine, segments=segments)


def _tag(tags: str, key: str) -> str | None:
    """The value of `key` in a Slicer `Segment<i>_Tags` field ("key:value|key:value|"), None if absent."""
    for item in tags.split("|"):
        name, sep, value = item.strip().partition(":")
        if sep and name == key:
            return value
    return None

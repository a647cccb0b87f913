"""Quality checks of one segmentation result, per structure and per scan, before it reaches a PACS.

    report = check_scan(label_map, ct, affine, structures.label_names())
    report.held            # True: the site's policy holds this result back
    write_quality_json(report, "ct_quality.json")
    record["quality"] = report.to_manifest()

Every check is a small pure function of numpy arrays, tested alone (tests/test_quality.py), and each
returns one or more `CheckResult` with the status "pass", "fail" or "not_applicable". The checks
(names are the keys of `QualityPolicy` and of the JSON):

- "incomplete" (per structure): the structure has voxels in the scan's first or last slice along the
  superior-inferior axis (the voxel axis closest to RAS z): it is cut by the field of view, so its
  volume and statistics are of a part only (`StructureQuality.incomplete`). The same rule as IDC's
  CloudSegmentatorResults QC ("at least one empty slice above and below").
- "components" (per structure, single organs only: every structure but `MULTIPART_STRUCTURES`):
  fragments beyond the largest connected component (26-connectivity) that hold more than
  `QualityThresholds.fragment_share` of the structure's voxels.
- "laterality" (per left/right structure): the side of the structure's centroid in patient coordinates
  (RAS: +x is the patient's right) against the midline (mean x of the vertebrae and sacrum present,
  else the centroid of the body, voxels above -500 HU), and against its counterpart of the other side
  when both are present (the left one must lie further left); heart chambers only against their
  counterpart (`PAIR_ONLY_LATERALITY`).
- "volume" (per structure with a cited normal range in `NORMAL_VOLUMES_ML`): volume outside it. Not
  applicable for an incomplete structure.
- "neighbours" (per scan): a vertebra missing between two present ones, a rib missing between two
  present ribs of the same side (`SERIES`).
- "hu_range" (per scan): intensities that are not CT numbers as expected: no air (minimum of the
  non-padding voxels above `QualityThresholds.air_max_hu`, e.g. a series without its rescale), or
  values below `min_hu` / above `max_hu` (12-bit CT range -1024..3071 HU; extended-range scans with
  metal exceed it).
- "padding" (per scan): padding voxels above `QualityThresholds.padding_share` of the volume.

`QualityPolicy` says, per check, what a failure does: "hold" (the result must not be sent on),
"mark" (sent, flagged as needing review) or "report" (only written down). Defaults: `DEFAULT_ACTIONS`.

Coordinates: the affine maps voxel indices (X, Y, Z) to RAS millimetres (+x right, +y anterior,
+z superior), as `clinical.dicom_series` and NIfTI give it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from clinical.statistics import StructureStatistics, structure_statistics
from wholebody.atomic import atomic_path

CHECKS = ("incomplete", "components", "laterality", "volume", "neighbours", "hu_range", "padding")
ACTIONS = ("hold", "mark", "report")
# Why these defaults: a left/right swap or a CT that is not in HU makes every number wrong, so those
# results wait for a person; a cut or fragmented organ or a gap in the spine is usually still useful
# once flagged; an unusual volume or much padding may be the patient, not the model.
DEFAULT_ACTIONS: dict[str, str] = {
    "incomplete": "mark", "components": "mark", "laterality": "hold", "volume": "report",
    "neighbours": "mark", "hu_range": "hold", "padding": "report",
}

# Structures that are not one connected organ, so the "components" check does not apply: bowel leaves and
# re-enters an axial field of view and is often seen as separate loops; "face" is a region, not an organ.
# Every other structure of clinical/structures.json (vertebrae and ribs included) is one connected piece.
MULTIPART_STRUCTURES = frozenset({"small_bowel", "colon", "face"})

# Population-based normal volumes (mL = cm^3), each with its source. Only ranges that can be cited.
NORMAL_VOLUMES_ML: dict[str, tuple[float, float, str]] = {
    "liver": (824.5, 1700.0, "Kim DW, Ha J, Lee SS et al., Population-based and personalized reference intervals for "
              "liver and spleen volumes in healthy individuals and those with viral hepatitis, Radiology: central "
              "95% of 2,989 healthy adult living liver donors, CT volumetry"),
    "spleen": (81.1, 322.0, "Kim DW, Ha J, Lee SS et al., Population-based and personalized reference intervals for "
               "liver and spleen volumes in healthy individuals and those with viral hepatitis, Radiology: central "
               "95% of 2,989 healthy adult living liver donors, CT volumetry"),
}

# Anatomical series whose members are expected without gaps, in cranio-caudal order (structures.json names).
SERIES: dict[str, tuple[str, ...]] = {
    "vertebrae": tuple(f"vertebrae_C{i}" for i in range(1, 8)) + tuple(f"vertebrae_T{i}" for i in range(1, 13))
    + tuple(f"vertebrae_L{i}" for i in range(1, 6)),
    "ribs left": tuple(f"rib_left_{i}" for i in range(1, 13)),
    "ribs right": tuple(f"rib_right_{i}" for i in range(1, 13)),
}
# The heart lies mostly left of the midline, its right ventricle included: its chambers are judged only
# against their counterpart (the right atrium/ventricle must lie to the right of the left one).
PAIR_ONLY_LATERALITY = frozenset({"heart_atrium_left", "heart_atrium_right", "heart_ventricle_left",
                                  "heart_ventricle_right"})
MIDLINE_STRUCTURES = SERIES["vertebrae"] + ("sacrum",)
BODY_MIN_HU = -500.0  # voxels above this are body (soft tissue and bone), below it air and lung
PADDING_BELOW_HU = -2000.0  # the client's rule where DICOM gives no PixelPaddingValue (client.inputs)
_SIDE = re.compile(r"(?:^|_)(left|right)(?:_|$)")


@dataclass(frozen=True)
class QualityThresholds:
    """Numbers of the checks (site-adjustable). Sources: fragment_share and padding_share are this
    project's choices (a fragment of 5 % is more than the specks automatic segmentations leave; half
    the volume padded means a small field of view in a large grid); min_hu/max_hu are the 12-bit CT
    range (-1024..3071 HU) with 176 HU of slack below for noise; air_max_hu: air is -1000 HU, so a CT
    in HU has voxels below -900 HU (air outside the body or in the lungs)."""

    fragment_share: float = 0.05
    padding_share: float = 0.5
    min_hu: float = -1200.0
    max_hu: float = 3071.0
    air_max_hu: float = -900.0


@dataclass(frozen=True)
class CheckResult:
    """One check's outcome: `check` (a name of CHECKS), `status` "pass" | "fail" | "not_applicable",
    `structure` (None for a per-scan check), a one-line `detail`, and the numbers it used (`values`)."""

    check: str
    status: str
    structure: str | None = None
    detail: str = ""
    values: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class QualityPolicy:
    """Per check, what a failure does: "hold" | "mark" | "report" (defaults: DEFAULT_ACTIONS)."""

    actions: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_ACTIONS))

    def __post_init__(self) -> None:
        bad = {k: v for k, v in self.actions.items() if k not in CHECKS or v not in ACTIONS}
        if bad:
            raise ValueError(f"quality policy {bad}: checks are {', '.join(CHECKS)}, actions {', '.join(ACTIONS)}")
        object.__setattr__(self, "actions", {**DEFAULT_ACTIONS, **self.actions})

    @classmethod
    def parse(cls, text: str) -> QualityPolicy:
        """From "incomplete=mark,laterality=hold" (unnamed checks keep their default).

        Raises ValueError naming the valid checks and actions."""
        actions = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            check, sep, action = part.partition("=")
            if not sep:
                raise ValueError(f"quality policy {part!r}: write CHECK=ACTION, e.g. laterality=hold")
            actions[check.strip()] = action.strip()
        return cls(actions)

    def action(self, check: str) -> str:
        return self.actions[check]


@dataclass(frozen=True)
class StructureQuality:
    """One structure's checks; `incomplete`: cut by the first or last slice (volume and statistics are of
    a part); `volume_ml` as `clinical.statistics` computed it."""

    label: int
    name: str
    volume_ml: float
    incomplete: bool
    checks: list[CheckResult]


@dataclass(frozen=True)
class QualityReport:
    """All checks of one result and what the policy makes of them.

    held: some failed check's action is "hold"; marked: the checks (names) that failed with "mark".
    """

    structures: list[StructureQuality]
    scan_checks: list[CheckResult]
    policy: dict[str, str]
    held: bool
    marked: list[str]

    def failures(self) -> list[CheckResult]:
        """Every failed check, per structure then per scan."""
        return [c for s in self.structures for c in s.checks if c.status == "fail"] + [
            c for c in self.scan_checks if c.status == "fail"]

    def to_dict(self) -> dict[str, Any]:
        """Everything, for the JSON file (`write_quality_json`)."""
        return {"held": self.held, "marked": self.marked, "policy": self.policy,
                "failed": self.failed_counts(),
                "structures": {s.name: {"label": s.label, "volume_ml": s.volume_ml, "incomplete": s.incomplete,
                                        "checks": [_check_dict(c) for c in s.checks]} for s in self.structures},
                "scan": [_check_dict(c) for c in self.scan_checks]}

    def failed_counts(self) -> dict[str, int]:
        counts = {name: 0 for name in CHECKS}
        for c in self.failures():
            counts[c.check] += 1
        return {k: v for k, v in counts.items() if v}

    def to_manifest(self) -> dict[str, Any]:
        """A short summary for the cohort manifest: held, marked checks, failures per check, and the
        structures that failed (check -> names) and are incomplete."""
        by_check: dict[str, list[str]] = {}
        for c in self.failures():
            by_check.setdefault(c.check, []).append(c.structure or c.detail)
        return {"held": self.held, "marked": self.marked, "failed": self.failed_counts(),
                "failures": by_check, "incomplete": [s.name for s in self.structures if s.incomplete]}


def _check_dict(c: CheckResult) -> dict[str, Any]:
    data = asdict(c)
    if data["structure"] is None:
        data.pop("structure")
    return data


# ---------------------------------------------------------------------------------------------- geometry

def axial_axis(affine: np.ndarray) -> int:
    """The voxel axis (0, 1, 2) closest to the superior-inferior direction (RAS z) of a [4, 4] affine."""
    directions = np.asarray(affine, np.float64)[:3, :3]
    directions = directions / np.linalg.norm(directions, axis=0)
    return int(np.argmax(np.abs(directions[2])))


def mean_index(mask: np.ndarray) -> np.ndarray:
    """Mean voxel index [3] (float64) of the True voxels of a boolean [X, Y, Z] mask, from its projections on
    each axis (no list of voxel indices is made). Raises ValueError for an empty mask."""
    total = int(np.count_nonzero(mask))
    if not total:
        raise ValueError("an empty mask has no centroid")
    out = np.empty(3)
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        counts = mask.sum(axis=others, dtype=np.int64)
        out[axis] = float(np.dot(np.arange(mask.shape[axis]), counts)) / total
    return out


def to_ras(index: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """RAS mm [3] of a (fractional) voxel index [3] through the [4, 4] affine."""
    a = np.asarray(affine, np.float64)
    return a[:3, :3] @ np.asarray(index, np.float64) + a[:3, 3]


def side_of(name: str) -> str | None:
    """"left" / "right" for a lateral structure name (kidney_left, rib_right_3), else None."""
    found = _SIDE.search(name)
    return found.group(1) if found else None


def counterpart(name: str) -> str:
    """The same structure of the other side: kidney_left -> kidney_right."""
    side = side_of(name)
    other = "right" if side == "left" else "left"
    return _SIDE.sub(lambda m: m.group(0).replace(m.group(1), other), name, count=1)


# ---------------------------------------------------------------------------------------------- checks

def check_incomplete(name: str, first: bool, last: bool) -> CheckResult:
    """"fail" if the structure has voxels in the scan's `first` or `last` slice along the axial axis."""
    cut = [where for where, hit in (("first", first), ("last", last)) if hit]
    return CheckResult("incomplete", "fail" if cut else "pass", name,
                       f"cut by the {' and '.join(cut)} slice of the scan" if cut else "",
                       {"first_slice": bool(first), "last_slice": bool(last)})


def touches_ends(mask: np.ndarray, box: tuple[slice, ...], axis: int, length: int) -> tuple[bool, bool]:
    """Whether boolean `mask`, the crop `box` of a volume `length` slices long along `axis`, has voxels in
    the volume's first and in its last slice along that axis."""
    first = box[axis].start == 0 and bool(np.take(mask, 0, axis=axis).any())
    last = box[axis].stop == length and bool(np.take(mask, -1, axis=axis).any())
    return first, last


def check_components(name: str, mask: np.ndarray, fragment_share: float) -> CheckResult:
    """Connected components (26-connectivity, scipy.ndimage.label) of boolean `mask`: "fail" when the
    pieces beyond the largest hold more than `fragment_share` (0..1) of the voxels, or any single one
    does; "not_applicable" for MULTIPART_STRUCTURES and empty masks."""
    if name in MULTIPART_STRUCTURES or not mask.any():
        return CheckResult("components", "not_applicable", name, "not a single organ" if mask.any() else "empty")
    labelled, _ = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    return components_result(name, np.bincount(labelled.ravel())[1:], fragment_share)


def components_result(name: str, sizes: np.ndarray, fragment_share: float) -> CheckResult:
    """The "components" check of a structure from the voxel counts [N] (integers, any order) of its N
    connected components: "fail" when those beyond the largest hold more than `fragment_share` (0..1) of
    its voxels; "not_applicable" for MULTIPART_STRUCTURES and for no components (an empty structure).
    `check_components` (one mask) and `check_scan` (all structures at once) both end here."""
    if not len(sizes):
        return CheckResult("components", "not_applicable", name, "empty")
    if name in MULTIPART_STRUCTURES:
        return CheckResult("components", "not_applicable", name, "not a single organ")
    count = len(sizes)
    total = int(np.sum(sizes, dtype=np.int64))
    largest = np.sort(np.asarray(sizes, np.int64))[::-1][:6]  # only the largest six are reported
    shares = [float(s) / total for s in largest]
    rest = 1.0 - shares[0]
    fails = rest > fragment_share
    return CheckResult("components", "fail" if fails else "pass", name,
                       f"{count} pieces, {100 * rest:.1f}% outside the largest (limit {100 * fragment_share:g}%)"
                       if fails else "", {"components": int(count), "largest_share": round(shares[0], 4),
                                          "other_shares": [round(s, 4) for s in shares[1:6]]})


def check_laterality(name: str, centroid_x: float, midline_x: float | None,
                     counterpart_x: float | None) -> CheckResult:
    """The side of a left/right structure from its centroid's RAS x (mm; +x = patient's right):
    "fail" if it lies on the other side of `midline_x`, or not further to its side than its
    `counterpart_x` (the other side's structure), when those are known."""
    side = side_of(name)
    if side is None or (midline_x is None and counterpart_x is None):
        return CheckResult("laterality", "not_applicable", name, "no side or no reference")
    sign = 1.0 if side == "right" else -1.0
    problems = []
    if midline_x is not None and sign * (centroid_x - midline_x) < 0:
        problems.append(f"centroid {abs(centroid_x - midline_x):.0f} mm on the patient's "
                        f"{'left' if side == 'right' else 'right'} of the midline")
    if counterpart_x is not None and sign * (centroid_x - counterpart_x) < 0:
        problems.append(f"on the other side of {counterpart(name)}")
    observed = side if not problems else ("right" if side == "left" else "left")
    values = {"centroid_x_ras_mm": round(centroid_x, 1), "observed_side": observed,
              "midline_x_ras_mm": None if midline_x is None else round(midline_x, 1),
              "counterpart_x_ras_mm": None if counterpart_x is None else round(counterpart_x, 1)}
    return CheckResult("laterality", "fail" if problems else "pass", name, "; ".join(problems), values)


def check_volume(name: str, volume_ml: float, incomplete: bool) -> CheckResult:
    """Volume (mL) against NORMAL_VOLUMES_ML; "not_applicable" without a range or for an incomplete structure."""
    if name not in NORMAL_VOLUMES_ML:
        return CheckResult("volume", "not_applicable", name, "no cited normal range")
    low, high, source = NORMAL_VOLUMES_ML[name]
    values = {"volume_ml": round(volume_ml, 1), "normal_ml": [low, high], "source": source}
    if incomplete:
        return CheckResult("volume", "not_applicable", name, "incomplete: cut by the scan", values)
    outside = not low <= volume_ml <= high
    return CheckResult("volume", "fail" if outside else "pass", name,
                       f"{volume_ml:.0f} mL outside the normal {low:g}-{high:g} mL" if outside else "", values)


def check_neighbours(present: set[str]) -> list[CheckResult]:
    """Per SERIES: "fail" naming the members missing between the first and last present one."""
    out = []
    for series, members in SERIES.items():
        found = [i for i, m in enumerate(members) if m in present]
        if len(found) < 2:
            out.append(CheckResult("neighbours", "not_applicable", None, f"{series}: fewer than two present"))
            continue
        missing = [m for m in members[found[0]:found[-1] + 1] if m not in present]
        out.append(CheckResult("neighbours", "fail" if missing else "pass", None,
                               f"{series}: {', '.join(missing)} missing between {members[found[0]]} and "
                               f"{members[found[-1]]}" if missing else series,
                               {"series": series, "missing": missing}))
    return out


def check_hu_range(low: float, high: float, thresholds: QualityThresholds) -> CheckResult:
    """The CT's minimum and maximum over non-padding voxels (HU) against `thresholds`."""
    problems = []
    if low > thresholds.air_max_hu:
        problems.append(f"no air: minimum {low:g} HU above {thresholds.air_max_hu:g} (not in HU? rescale missing?)")
    if low < thresholds.min_hu:
        problems.append(f"minimum {low:g} HU below {thresholds.min_hu:g}")
    if high > thresholds.max_hu:
        problems.append(f"maximum {high:g} HU above {thresholds.max_hu:g}")
    return CheckResult("hu_range", "fail" if problems else "pass", None, "; ".join(problems),
                       {"min_hu": low, "max_hu": high})


def check_padding(padded_fraction: float, thresholds: QualityThresholds) -> CheckResult:
    """The share (0..1) of padding voxels against `thresholds.padding_share`."""
    fails = padded_fraction > thresholds.padding_share
    return CheckResult("padding", "fail" if fails else "pass", None,
                       f"{100 * padded_fraction:.1f}% of the volume is padding (limit "
                       f"{100 * thresholds.padding_share:g}%)" if fails else "",
                       {"padded_percent": round(100 * padded_fraction, 2)})


# ---------------------------------------------------------------------------------------------- the scan

SLAB_VOXELS = 1 << 22  # voxels per slab of the whole-map passes (4 Mi: 16 slices of 512 x 512)
# check_scan crops each structure to its bounding box (as `check_components` etc. do one mask) while the boxes
# add up to at most this many volumes of the map, else it reads the whole map for all structures at once.
# Measured on 512x512x397 maps, 2-core AMD EPYC (perf/quality_speed.py): crops take ~0.5 s plus 1.0-1.6 CPU s
# per volume of boxes, the whole-map passes 5-9 s whatever the layout; organ-sized results have boxes of
# 0.6-1.5 volumes in all, random-weights results ~100. Below the break-even (~4-5) to spare the whole-map
# passes' time on organ-sized results.
CROP_VOLUMES_MAX = 3.0


def _memory_order(array: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    """A transposed view of 3-D `array` whose first axis is the slowest in memory (C order for NIfTI's
    Fortran-ordered arrays too), and for each of the view's axes the array's axis it is."""
    order = tuple(int(a) for a in np.argsort([-abs(st) for st in array.strides], kind="stable"))
    return array.transpose(order), order


def _slabs(view: np.ndarray, slab_voxels: int) -> list[tuple[int, int]]:
    """(start, stop) along the view's first axis, each slab holding about `slab_voxels` voxels (one slice at least)."""
    plane = max(int(view.shape[1]) * int(view.shape[2]), 1)
    step = max(1, slab_voxels // plane)
    return [(start, min(start + step, view.shape[0])) for start in range(0, view.shape[0], step)]


def axis_histograms(label_map: np.ndarray, slab_voxels: int = SLAB_VOXELS) -> list[np.ndarray]:
    """Voxels per index and label along each axis of a 3-D uint8 label map: three arrays [n_axis, 256] int64,
    `out[axis][i, label]` = voxels of `label` in slice i along `axis`. Two bincounts per voxel (one keyed by
    column and label per slab, one keyed by row and label per slice), slabs of ~`slab_voxels` along the
    slowest axis in memory; temporaries ~16 bytes x `slab_voxels`; no coordinate arrays. A structure's
    bounding box, its voxels in the first and last slice and its centroid follow from them."""
    view, order = _memory_order(np.asarray(label_map))
    out = [np.zeros((n, 256), np.int64) for n in view.shape]
    _, rows, cols = view.shape
    row_keys = (np.arange(rows, dtype=np.intp) * 256)[None, :, None]
    col_keys = (np.arange(cols, dtype=np.intp) * 256)[None, None, :]
    for start, stop in _slabs(view, slab_voxels):
        slab = view[start:stop].astype(np.intp)
        out[2] += np.bincount((slab + col_keys).ravel(), minlength=cols * 256).reshape(-1, 256)
        slab += row_keys
        for i, keys in enumerate(slab, start):  # per slice: [rows, 256] gives both other histograms
            counts = np.bincount(keys.ravel(), minlength=rows * 256).reshape(-1, 256)
            out[1] += counts
            out[0][i] = counts.sum(axis=0)
    result: list[np.ndarray] = [np.empty(0)] * 3
    for view_axis, axis in enumerate(order):
        result[axis] = out[view_axis]
    return result


def histogram_box(histograms: Sequence[np.ndarray], label: int) -> tuple[slice, ...]:
    """The bounding box of `label` (as `scipy.ndimage.find_objects` gives it) from `axis_histograms`.
    Raises ValueError for a label with no voxels."""
    box = []
    for counts in histograms:
        found = np.flatnonzero(counts[:, label])
        if not found.size:
            raise ValueError(f"label {label} has no voxels")
        box.append(slice(int(found[0]), int(found[-1]) + 1))
    return tuple(box)


def histogram_centroid(histograms: Sequence[np.ndarray], label: int) -> np.ndarray:
    """Mean voxel index [3] (float64) of `label` from `axis_histograms`: the same arithmetic as `mean_index`
    on its bounding-box crop plus the box's offset (integer sums, one division), so the same float bits.
    Raises ValueError for a label with no voxels."""
    box = histogram_box(histograms, label)
    out = np.empty(3)
    for axis, (counts, sl) in enumerate(zip(histograms, box)):
        inside = counts[sl, label]
        out[axis] = float(np.dot(np.arange(len(inside)), inside)) / int(inside.sum())
    return out + np.array([sl.start for sl in box], np.float64)


def component_sizes(label_map: np.ndarray, wanted: Sequence[int],
                    slab_voxels: int = SLAB_VOXELS) -> dict[int, np.ndarray]:
    """Voxel counts [N] int64 of the N connected components (26-connectivity) of each label in `wanted`, all
    labels at once: `skimage.measure.label` (regions of equal value, background 0) slab by slab along the
    slowest axis in memory, then the pieces that touch across each slab boundary are joined
    (`scipy.sparse.csgraph.connected_components`). Memory: ~30 bytes x `slab_voxels` for a slab's labelling
    plus ~40 bytes per component of the map (the whole map labelled at once would take 16 bytes per voxel:
    1.6 GB for 512x512x397). Equal to `scipy.ndimage.label` of each label's mask (tests/test_quality.py)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from skimage.measure import label as label_regions

    view, _ = _memory_order(np.asarray(label_map))
    sizes_parts: list[np.ndarray] = []
    owner_parts: list[np.ndarray] = []
    edges: list[np.ndarray] = []
    nodes = 0  # components found so far; the k-th (1-based) of a slab is node `base + k - 1`
    previous: tuple[np.ndarray, np.ndarray] | None = None  # last slice of the previous slab: (nodes, labels)
    for start, stop in _slabs(view, slab_voxels):
        slab = np.ascontiguousarray(view[start:stop])
        regions, count = label_regions(slab, connectivity=3, background=0, return_num=True)
        flat = regions.reshape(-1)
        sizes_parts.append(np.bincount(flat, minlength=count + 1)[1:])
        owner = np.zeros(count + 1, np.uint8)
        owner[flat] = slab.reshape(-1)
        owner_parts.append(owner[1:])
        base, nodes = nodes, nodes + count
        first = regions[0].astype(np.int64) + (base - 1)
        if previous is not None:
            edges.append(_boundary_edges(*previous, first, slab[0], nodes))
        previous = (regions[-1].astype(np.int64) + (base - 1), slab[-1].copy())
    if not nodes:
        return {int(v): np.zeros(0, np.int64) for v in wanted}
    sizes = np.concatenate(sizes_parts)
    owners = np.concatenate(owner_parts)
    pairs = np.concatenate(edges) if edges else np.zeros((0, 2), np.int64)
    graph = coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(nodes, nodes))
    count, group = connected_components(graph, directed=False)
    # sums of integer counts below 2**53 in float64 are exact
    merged = np.bincount(group, weights=sizes, minlength=count).astype(np.int64)
    merged_owner = np.zeros(count, np.uint8)
    merged_owner[group] = owners
    order = np.argsort(merged_owner, kind="stable")
    bounds = np.searchsorted(merged_owner[order], [(v, v + 1) for v in wanted])
    return {int(v): merged[order[lo:hi]] for v, (lo, hi) in zip(wanted, bounds)}


def _boundary_edges(before: np.ndarray, before_labels: np.ndarray, after: np.ndarray, after_labels: np.ndarray,
                    nodes: int) -> np.ndarray:
    """[K, 2] int64 unique pairs (a, b) of component nodes `a` in the last slice of one slab and `b` in the
    first slice of the next that touch (the 9 neighbours of 26-connectivity across the boundary) and have
    the same label, not 0. `before`/`after`: [R, C] int64 node per voxel (read only where the label is not
    0); `nodes`: more than any node (keys `a * nodes + b` are made unique)."""
    rows, cols = before.shape
    found = []
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            a = (slice(max(0, -dr), rows - max(0, dr)), slice(max(0, -dc), cols - max(0, dc)))
            b = (slice(max(0, dr), rows - max(0, -dr)), slice(max(0, dc), cols - max(0, -dc)))
            same = (before_labels[a] == after_labels[b]) & (before_labels[a] != 0)
            keys = before[a][same] * nodes + after[b][same]
            if keys.size:  # neighbouring voxels mostly repeat a pair: drop runs before sorting
                keys = keys[np.concatenate(([True], keys[1:] != keys[:-1]))]
            found.append(keys)
    keys = np.unique(np.concatenate(found))
    return np.stack((keys // nodes, keys % nodes), axis=1)


def structure_geometry(label_map: np.ndarray, present: Sequence[tuple[int, str]], axis: int,
                       slab_voxels: int = SLAB_VOXELS) -> dict[int, tuple[bool, bool, np.ndarray, np.ndarray | None]]:
    """Per present structure (label, name) of a 3-D uint8 map, from whole-map passes whatever the layout
    (`axis_histograms`, then `component_sizes` of the single organs): (voxels in the first slice along
    `axis`, voxels in the last, mean voxel index [3] float64, its components' voxel counts [N] int64 or
    None for MULTIPART_STRUCTURES). The same numbers as `touches_ends`, `mean_index` and
    `check_components` of each structure's crop. Raises ValueError for a structure with no voxels."""
    labels = np.asarray(label_map)
    histograms = axis_histograms(labels, slab_voxels)
    single = [value for value, name in present if name not in MULTIPART_STRUCTURES]
    sizes = component_sizes(labels, single, slab_voxels)
    last = labels.shape[axis] - 1
    return {value: (bool(histograms[axis][0, value]), bool(histograms[axis][last, value]),
                    histogram_centroid(histograms, value), sizes.get(value)) for value, _ in present}


def check_scan(
    label_map: np.ndarray,
    ct: np.ndarray,
    affine: np.ndarray,
    names: Sequence[str],
    policy: QualityPolicy | None = None,
    thresholds: QualityThresholds | None = None,
    padded_fraction: float | None = None,
    statistics: Sequence[StructureStatistics] | None = None,
    *,
    crop_volumes_max: float = CROP_VOLUMES_MAX,
) -> QualityReport:
    """Run every check on one result.

    The structures are measured on their bounding-box crops while those add up to at most
    `crop_volumes_max` volumes of the map (organ-sized results), else by whole-map passes for all of them
    at once (`structure_geometry`: random-weights results, every label scattered over the body, whose ~100
    full-volume crops took 84-128 s for 512x512x397 on 2 cores, now 9 s). Both give the same report; the
    time stays bounded whatever the layout (docs/quality-and-reports.md).

    Args:
        label_map: [X, Y, Z] uint8 labels (0 = background) on the CT's grid.
        ct: [X, Y, Z] the CT in HU (int16 or float), as segmented.
        affine: [4, 4] voxel -> RAS mm.
        names: structure names indexed by label value (clinical.structures.label_names()).
        policy: per-check actions (default DEFAULT_ACTIONS); thresholds: the checks' numbers.
        padded_fraction: share of padding voxels (0..1) as the reader measured it (client.inputs.
            measure_padding); None: voxels below -2000 HU.
        statistics: `clinical.statistics.structure_statistics` of these arrays, if already computed.
        crop_volumes_max: see above; 0 always reads the whole map, math.inf always crops (the reference
            per mask: `touches_ends`, `mean_index`, `check_components`), for tests and perf/quality_speed.py.

    Raises:
        ValueError: shapes differ, the map is not uint8, or a label has no name.
    """
    policy = policy or QualityPolicy()
    thresholds = thresholds or QualityThresholds()
    labels = np.asarray(label_map)
    values = np.asarray(ct)
    if labels.dtype != np.uint8:
        raise ValueError(f"label map must be uint8, got {labels.dtype}")
    if labels.shape != values.shape:
        raise ValueError(f"label map {list(labels.shape)} and CT {list(values.shape)} must have the same shape")
    if labels.ndim != 3:
        raise ValueError(f"label map must be 3-D [X, Y, Z], got shape {list(labels.shape)}")
    stats = list(statistics) if statistics is not None else structure_statistics(labels, values, affine, names)
    axis = axial_axis(affine)
    centroids: dict[str, np.ndarray] = {}
    per_structure: dict[str, list[CheckResult]] = {}
    incomplete: dict[str, bool] = {}
    boxes = ndimage.find_objects(labels)  # one pass; None for an absent label
    cropped = sum(int(np.prod([sl.stop - sl.start for sl in boxes[row.label - 1]], dtype=np.int64))
                  for row in stats)
    if cropped <= crop_volumes_max * labels.size:
        for row in stats:
            box = boxes[row.label - 1]
            mask = labels[box] == row.label
            result = check_incomplete(row.name, *touches_ends(mask, box, axis, labels.shape[axis]))
            incomplete[row.name] = result.status == "fail"
            offset = np.array([sl.start for sl in box], np.float64)
            centroids[row.name] = to_ras(mean_index(mask) + offset, affine)
            per_structure[row.name] = [result, check_components(row.name, mask, thresholds.fragment_share),
                                       check_volume(row.name, row.volume_ml, incomplete[row.name])]
    else:
        geometry = structure_geometry(labels, [(row.label, row.name) for row in stats], axis)
        for row in stats:
            first, last, index, sizes = geometry[row.label]
            result = check_incomplete(row.name, first, last)
            incomplete[row.name] = result.status == "fail"
            centroids[row.name] = to_ras(index, affine)
            components = (CheckResult("components", "not_applicable", row.name, "not a single organ")
                          if sizes is None else components_result(row.name, sizes, thresholds.fragment_share))
            per_structure[row.name] = [result, components,
                                       check_volume(row.name, row.volume_ml, incomplete[row.name])]
    midline = [centroids[n][0] for n in MIDLINE_STRUCTURES if n in centroids]
    if midline:
        midline_x: float | None = float(np.mean(midline))
    else:
        body = values > BODY_MIN_HU
        midline_x = float(to_ras(mean_index(body), affine)[0]) if body.any() else None
    for name, checks in per_structure.items():
        if side_of(name) is not None:
            other = centroids.get(counterpart(name))
            reference = None if name in PAIR_ONLY_LATERALITY else midline_x
            checks.insert(2, check_laterality(name, float(centroids[name][0]), reference,
                                              None if other is None else float(other[0])))
    real = values >= PADDING_BELOW_HU  # the client's padding rule: below -2000 HU is not a CT number
    if padded_fraction is None:
        padded_fraction = 1.0 - float(np.count_nonzero(real)) / max(values.size, 1)
    low = float(np.min(values, where=real, initial=values.max())) if real.any() else 0.0
    high = float(np.max(values, where=real, initial=values.min())) if real.any() else 0.0
    scan_checks = [*check_neighbours(set(per_structure)), check_hu_range(low, high, thresholds),
                   check_padding(padded_fraction, thresholds)]
    structures_q = [StructureQuality(row.label, row.name, row.volume_ml, incomplete[row.name], per_structure[row.name])
                    for row in stats]
    failed = {c.check for s in structures_q for c in s.checks if c.status == "fail"} | {
        c.check for c in scan_checks if c.status == "fail"}
    actions = dict(policy.actions)
    return QualityReport(structures_q, scan_checks, actions,
                         held=any(actions[c] == "hold" for c in failed),
                         marked=sorted(c for c in failed if actions[c] == "mark"))


def write_quality_json(report: QualityReport, path: str | os.PathLike[str]) -> None:
    """Write `report.to_dict()` as JSON, atomically (wholebody.atomic)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(report.to_dict(), indent=2) + "\n")

"""TotalSegmentator subject folders -> one uint8 label map in the bundle's order.

A TotalSegmentator subject (its public dataset, or `TotalSegmentator -i ct.nii.gz -o segmentations`) is

    s0001/ct.nii.gz
    s0001/segmentations/<structure>.nii.gz        one binary mask per structure, on ct.nii.gz's grid

The bundle's labels are TotalSegmentator v1's 104 classes in v1's order (`clinical/structures.json`, the
one source of the names and their label values). v2 kept the spelling of every v1 name it still makes, so a
mask maps to the label of its file name. `evaluation/totalsegmentator_v2.json` is the one table of what
differs between v1 and v2 (with its source: TotalSegmentator 2.18's `map_to_binary.py` and
`resources/improvements_in_v2.md`): six heart labels and `face` that v2 moved to other tasks (absent unless
those tasks were run into the folder), and v2 structures without a v1 label (`heart`, `skull`, ...), which
are left out and named in the report.

Checks:
- geometry: every mask must have ct.nii.gz's shape and affine (to `AFFINE_TOLERANCE_MM`): otherwise
  `MergeError`, one line naming the mask and the fix; nothing is written.
- missing masks: the label stays absent from the merged file; the report names the structures.
- overlaps (a voxel in two or more masks): counted per pair of structures and resolved by `--overlap`:
  `smaller` (default) gives the voxel to the structure with fewer voxels in this subject. Overlaps are
  boundary voxels of touching structures or a small structure inside a larger one (a vessel in an organ);
  the voxel is a much larger share of the smaller structure, so giving it to the larger costs the smaller
  one's Dice far more, and the result does not depend on the arbitrary label order. `later` gives it to
  the higher label, as TotalSegmentator's own `combine_masks_to_multilabel_file` (libs.py) does, for
  results identical to that tool's; `refuse` writes nothing and lists the overlaps.

A pair's count is exact when at most two masks claim a voxel; a voxel claimed by three or more masks is
counted once for the pair (owner so far, mask being painted) and in `MergeReport.multiple`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import nibabel as nib
import numpy as np

from client.outputs import label_map_image, write_nifti
from clinical import structures

log = logging.getLogger(__name__)

V2_TABLE = Path(__file__).with_name("totalsegmentator_v2.json")
CT_NAME = "ct.nii.gz"
MASKS_FOLDER = "segmentations"
AFFINE_TOLERANCE_MM = 1e-3  # largest difference of an affine entry (mm) still taken as the same grid
MASK_THRESHOLD = 0.5  # a voxel is in a mask above this value (TotalSegmentator's combine uses > 0.5 too)
OVERLAP_RULES = ("smaller", "later", "refuse")


class MergeError(ValueError):
    """A subject cannot be merged; the message is one line naming the file and the fix."""


@cache
def v2_table() -> dict:
    """evaluation/totalsegmentator_v2.json: `renamed` (v2 name -> v1 name; empty: none was renamed),
    `moved_out_of_total` (v1 name -> the v2 task that makes it now), `without_v1_label` (v2 name -> why)."""
    return json.loads(V2_TABLE.read_text())


def bundle_label(name: str) -> int | None:
    """The bundle's label value of a mask named `name` (v1 or v2 spelling), None when the bundle has none."""
    name = v2_table()["renamed"].get(name, name)
    names = structures.label_names()
    return names.index(name) if name in names[1:] else None


@dataclass
class MergeReport:
    """What one merge did. `overlaps`: (label a, label b) with a < b -> voxels in both masks."""

    subject: Path
    output: Path | None
    present: list[int] = field(default_factory=list)  # labels written (non-empty masks)
    empty: list[int] = field(default_factory=list)  # masks found with no voxel
    missing: list[int] = field(default_factory=list)  # labels without a mask file
    left_out: dict[str, str] = field(default_factory=dict)  # mask name -> why it has no label
    overlaps: dict[tuple[int, int], int] = field(default_factory=dict)
    multiple: int = 0  # voxels claimed by three or more masks
    rule: str = "smaller"
    not_binary: dict[str, str] = field(default_factory=dict)  # mask name -> how its values were read

    def lines(self) -> list[str]:
        """The report for people, one finding per line."""
        names = structures.label_names()
        out = [f"{self.subject}: {len(self.present)} structures"
               + (f" -> {self.output}" if self.output else "")]
        if self.missing:
            moved = v2_table()["moved_out_of_total"]
            out.append(f"  {len(self.missing)} structures without a mask (absent from the label map): "
                       + ", ".join(names[i] + (f" (v2 task {moved[names[i]]})" if names[i] in moved else "")
                                   for i in self.missing))
        if self.empty:
            out.append(f"  {len(self.empty)} empty masks: " + ", ".join(names[i] for i in self.empty))
        for name, how in sorted(self.not_binary.items()):
            out.append(f"  {name}: not a 0/1 mask ({how})")
        reasons: dict[str, list[str]] = {}
        for name, why in sorted(self.left_out.items()):
            reasons.setdefault(why, []).append(name)
        for why, left in reasons.items():
            out.append(f"  {len(left)} mask{'' if len(left) == 1 else 's'} left out ({why}): {', '.join(left)}")
        if self.overlaps:
            total = sum(self.overlaps.values())
            out.append(f"  {len(self.overlaps)} overlapping pairs, {total} voxels, resolved by rule '{self.rule}'"
                       + (f"; {self.multiple} voxels in 3+ masks" if self.multiple else ""))
            for (a, b), n in sorted(self.overlaps.items(), key=lambda kv: -kv[1]):
                out.append(f"    {names[a]} & {names[b]}: {n} voxels")
        return out

    def to_json(self) -> dict:
        names = structures.label_names()
        return {
            "subject": str(self.subject), "output": str(self.output) if self.output else None, "rule": self.rule,
            "present": [names[i] for i in self.present], "empty": [names[i] for i in self.empty],
            "missing": [names[i] for i in self.missing], "left_out": self.left_out,
            "overlaps": [{"a": names[a], "b": names[b], "voxels": n} for (a, b), n in sorted(self.overlaps.items())],
            "multiple": self.multiple, "not_binary": self.not_binary,
        }


@dataclass
class _Mask:
    label: int
    box: tuple[slice, ...]
    inside: np.ndarray  # bool, the mask within `box`
    voxels: int
    note: str | None = None  # why the file was not a plain 0/1 mask (`_binarise`)


def same_grid(image: nib.Nifti1Image, ct: nib.Nifti1Image) -> bool:
    """Whether two images share one voxel grid: equal shapes, affines equal to AFFINE_TOLERANCE_MM."""
    return volume_shape(image) == volume_shape(ct) and np.allclose(image.affine, ct.affine, rtol=0,
                                                                    atol=AFFINE_TOLERANCE_MM)


def volume_shape(image: nib.Nifti1Image) -> tuple[int, ...]:
    """The image's shape without trailing dimensions of size 1: [X, Y, Z, 1] (a 3-D volume some tools save
    with a time or channel axis of one) is [X, Y, Z]."""
    shape = tuple(int(n) for n in image.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _read_mask(path: Path, label: int, ct: nib.Nifti1Image) -> _Mask:
    try:
        image = nib.load(path)
    except Exception as exc:  # nibabel raises many types for unreadable files
        raise MergeError(f"{path}: cannot be read as NIfTI ({exc}); replace the file") from None
    if not same_grid(image, ct):
        raise MergeError(
            f"{path}: grid {list(image.shape)} / affine {np.round(image.affine[:3], 3).tolist()} differs from "
            f"{ct.get_filename()}'s {list(ct.shape)} / {np.round(ct.affine[:3], 3).tolist()}; resample the mask onto "
            "ct.nii.gz's grid (nearest neighbour) or use the CT it was made from")
    mask, note = _binarise(np.asanyarray(image.dataobj).reshape(volume_shape(image)), path)
    axes = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != k))) for k in range(3)]
    if any(len(a) == 0 for a in axes):
        return _Mask(label, (slice(0, 0),) * 3, np.zeros((0, 0, 0), bool), 0, note)
    box = tuple(slice(int(a[0]), int(a[-1]) + 1) for a in axes)
    inside = np.ascontiguousarray(mask[box])
    return _Mask(label, box, inside, int(inside.sum()), note)


def _binarise(data: np.ndarray, path: Path) -> tuple[np.ndarray, str | None]:
    """[X, Y, Z] bool mask (> MASK_THRESHOLD) of a mask file's voxels, and a note when they were not 0/1.

    0/1 masks (TotalSegmentator's uint8) pass as they are. A soft mask (floats within 0..1, e.g.
    probabilities) and a mask of 0 and one other value (0/255) are binarised at > MASK_THRESHOLD, with a
    note for the report.

    Raises:
        MergeError: NaN or negative values, or several different non-zero values (a label map of many
            structures, not one structure's mask: binarising it would give all of them one label).
    """
    floating = np.issubdtype(data.dtype, np.floating)
    if floating and np.isnan(data).any():
        raise MergeError(f"{path}: NaN values in the mask; replace the file with a 0/1 mask")
    low, high = (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
    if low < 0:
        raise MergeError(f"{path}: negative values ({low:g}) in the mask; a mask holds 0 and 1, replace the file")
    if high <= 1 and (not floating or np.all((data == 0) | (data == 1))):
        return data > MASK_THRESHOLD, None
    if high <= 1:
        return data > MASK_THRESHOLD, f"soft mask, values {low:g}..{high:g}, binarised at > {MASK_THRESHOLD:g}"
    if np.count_nonzero(data) == np.count_nonzero(data == high):
        return data > MASK_THRESHOLD, f"values 0 and {high:g}, taken as 0/1"
    raise MergeError(f"{path}: values {low:g}..{high:g}, several different non-zero values: a label map, not one "
                     "structure's mask; give one 0/1 mask per structure (TotalSegmentator's segmentations/), or use "
                     "a label map in the bundle's order directly as ground truth (python -m evaluation evaluate)")


def merge_subject(subject: Path, output: Path | None, rule: str = "smaller") -> MergeReport:
    """Merge `subject`/segmentations/*.nii.gz into one label map on `subject`/ct.nii.gz's grid.

    Args:
        subject: a TotalSegmentator subject folder (ct.nii.gz and segmentations/).
        output: the label file to write (.nii.gz: gzip; written atomically, `wholebody.atomic`); None to
            check only.
        rule: how a voxel in several masks is resolved, one of OVERLAP_RULES (module docstring).
    Returns:
        The report; the label map written is [X, Y, Z] uint8 with ct.nii.gz's shape, affine and header,
        values 0..104 in the bundle's order.
    Raises:
        MergeError: no ct.nii.gz or segmentations/, no mask named after a bundle structure, an unreadable
            mask, a mask on another grid, a mask that is a label map or holds NaN or negative values, overlaps
            with rule "refuse", an output that is the subject's CT or in its segmentations/, or an output that
            cannot be written (nothing written in each case).
    """
    if rule not in OVERLAP_RULES:
        raise ValueError(f"unknown overlap rule {rule!r}; choose one of {OVERLAP_RULES}")
    ct_path, masks_dir = subject / CT_NAME, subject / MASKS_FOLDER
    if output is not None:
        check_output(subject, output)
    if masks_dir.is_dir() and not ct_path.is_file():
        raise MergeError(f"{ct_path}: missing; put the CT the masks were made from there (the label map takes its "
                         "grid and header)")
    if not ct_path.is_file() or not masks_dir.is_dir():
        raise MergeError(f"{subject}: not a TotalSegmentator subject folder (needs {CT_NAME} and {MASKS_FOLDER}/); "
                         "give the folder holding both")
    try:
        ct = nib.load(ct_path)  # header and affine only: the CT's voxels are never read
    except Exception as exc:
        raise MergeError(f"{ct_path}: cannot be read as NIfTI ({exc}); replace the file") from None
    if len(volume_shape(ct)) != 3:
        raise MergeError(f"{ct_path}: {len(ct.shape)}-D image, a CT volume is 3-D; give the 3-D CT")
    report = MergeReport(subject=subject, output=output, rule=rule)
    masks: list[_Mask] = []
    found: set[int] = set()
    table = v2_table()
    for path in sorted(masks_dir.iterdir()):
        if not path.name.endswith((".nii.gz", ".nii")) or path.name.startswith("."):
            continue
        name = path.name.removesuffix(".gz").removesuffix(".nii")
        label = bundle_label(name)
        if label is None:
            report.left_out[name] = table["without_v1_label"].get(name) or _unknown_name(name)
            continue
        if label in found:
            raise MergeError(f"{path}: a second mask for {name}; keep one of {name}.nii.gz and {name}.nii")
        found.add(label)
        mask = _read_mask(path, label, ct)
        if mask.note:
            report.not_binary[name] = mask.note
        if mask.voxels:
            masks.append(mask)
        else:
            report.empty.append(label)
    if not found:  # an all-zero label map would pass as ground truth in which every structure is absent
        files = sorted(report.left_out)
        raise MergeError(
            f"{masks_dir}: " + (f"none of its {len(files)} masks is named after a bundle structure ({files[0]}: "
                                f"{report.left_out[files[0]]}); name them as TotalSegmentator does "
                                "(clinical/structures.json)" if files else
                                "no masks (.nii.gz) in it; run TotalSegmentator into it "
                                "(TotalSegmentator -i ct.nii.gz -o segmentations) or give the right folder"))
    report.missing = [i for i in range(1, len(structures.label_names())) if i not in found]
    report.empty.sort()

    # paint in an order such that the rule's winner comes last
    order = sorted(masks, key=(lambda m: (-m.voxels, m.label)) if rule == "smaller" else (lambda m: m.label))
    labels = np.zeros(volume_shape(ct), np.uint8)
    claims = np.zeros(volume_shape(ct), np.uint8)  # masks claiming each voxel (saturating at 255 is never reached: 104)
    for mask in order:
        region, counted = labels[mask.box], claims[mask.box]
        owners = region[mask.inside]
        taken = owners[owners > 0]
        if taken.size:
            for owner, n in zip(*np.unique(taken, return_counts=True)):
                pair = (min(int(owner), mask.label), max(int(owner), mask.label))
                report.overlaps[pair] = report.overlaps.get(pair, 0) + int(n)
        counted[mask.inside] += 1
        region[mask.inside] = mask.label
    report.multiple = int((claims >= 3).sum())
    report.present = sorted(m.label for m in masks)
    if report.overlaps and rule == "refuse":
        names = structures.label_names()
        (a, b), n = max(report.overlaps.items(), key=lambda kv: kv[1])
        raise MergeError(f"{masks_dir}: {len(report.overlaps)} pairs of masks overlap (largest: {names[a]} & "
                         f"{names[b]}, {n} voxels); fix the masks or choose --overlap smaller or later")
    if output is not None:
        try:
            write_nifti(label_map_image(labels, ct), output)
        except OSError as exc:  # the atomic writer's message names its temporary file, not the output
            raise MergeError(f"{output}: cannot be written ({exc.strerror or exc}); choose a writable -o with room "
                             "for it") from None
    return report


def _unknown_name(name: str) -> str:
    """The report's reason for a mask name the bundle does not know, with the closest known names."""
    import difflib

    close = difflib.get_close_matches(name, structures.label_names()[1:], n=2, cutoff=0.75)
    return ("not a TotalSegmentator structure name the bundle knows (clinical/structures.json)"
            + (f"; did you mean {' or '.join(close)}?" if close else ""))


def check_output(subject: Path, output: Path) -> None:
    """Refuse an output path that would overwrite the subject's own files.

    Raises:
        MergeError: `output` is the subject's ct.nii.gz or lies in its segmentations/ (read as a mask next time).
    """
    target = output.resolve()
    if target == (subject / CT_NAME).resolve():
        raise MergeError(f"{output}: is the subject's CT, which the label map would replace; give another -o "
                         f"(e.g. {subject.name}_labels.nii.gz)")
    if (subject / MASKS_FOLDER).resolve() in target.parents:
        raise MergeError(f"{output}: inside {subject / MASKS_FOLDER}/, where a rerun would read it as a mask; give "
                         f"an -o outside it (e.g. {subject.name}_labels.nii.gz)")


def subjects_under(root: Path) -> list[Path]:
    """`root` itself when it is a subject folder, else its sub-folders that are, sorted (the dataset). A
    sub-folder with segmentations/ but no ct.nii.gz counts too, so that its merge names what is missing
    instead of the subject silently dropping out of the dataset."""
    if (root / CT_NAME).is_file():
        return [root]
    return sorted(p for p in root.iterdir()
                  if p.is_dir() and ((p / CT_NAME).is_file() or (p / MASKS_FOLDER).is_dir()))

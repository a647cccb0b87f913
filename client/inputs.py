"""Finding and reading the scans of a cohort: files and folders in, `Scan`s and `Volume`s out.

A scan is whatever one CT volume is stored as. Today that is one NIfTI file (`.nii`, `.nii.gz`, any
letter case); a DICOM series is a folder, so discovery asks every format both about files and about
folders (`ScanFormat.claims_folder`), and a format added later plugs in by being listed in `FORMATS`.

Reading is split in two so that a client can refuse a volume before allocating it: `read_header`
gives shape and affine from the first bytes, `read_volume` the voxels.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Protocol

import nibabel as nib
import numpy as np
from isal import igzip

# Image formats users may point us at that this client does not read: one line each, with the fix.
UNSUPPORTED_SUFFIXES = {
    ".nrrd": "NRRD",
    ".nhdr": "NRRD",
    ".mha": "MetaImage",
    ".mhd": "MetaImage",
    ".mgz": "MGH",
    ".mgh": "MGH",
    ".img": "Analyze",
    ".hdr": "Analyze",
    ".dcm": "DICOM",
}
CONVERT_HINT = "convert it to NIfTI (.nii.gz), e.g. with SimpleITK or dcm2niix"


class ScanError(ValueError):
    """A scan cannot be read as a CT volume; the message names the file and the reason in one line."""


@dataclass(frozen=True)
class Header:
    """What is known of a volume before reading its voxels."""

    shape: tuple[int, int, int]  # voxels along the array's axes X, Y, Z
    affine: np.ndarray  # [4, 4] float64: voxel index (i, j, k, 1) -> RAS world in mm


@dataclass
class Volume:
    """One CT volume as read from its scan.

    `array` is [X, Y, Z] in the file's voxel order, int16 when the file stores HU as int16 (or as
    another integer type whose values fit, without scaling), float32 HU otherwise; it may be
    Fortran-ordered (as NIfTI stores it): senders copy it into C order where it goes on the wire.
    `like` is the source image (header and affine) that NIfTI label maps copy.
    """

    array: np.ndarray
    affine: np.ndarray
    like: nib.Nifti1Image | nib.Nifti2Image


class ScanFormat(Protocol):
    """A way a CT volume is stored. Implementations: `NiftiFormat`; DICOM series later."""

    name: str

    def claims_file(self, path: Path) -> bool:
        """True if `path` (a file) is a whole scan in this format."""

    def claims_folder(self, path: Path) -> bool:
        """True if `path` (a folder) is one scan in this format (a DICOM series); its files are not scans."""

    def stem(self, path: Path) -> str:
        """The scan's name without its format's extension (`ct.nii.gz` -> `ct`), for output names."""

    def read_header(self, path: Path) -> Header:
        """Shape and affine without reading the voxels; raises ScanError."""

    def read_volume(self, path: Path) -> Volume:
        """The voxels and geometry; raises ScanError with a one-line reason."""


def _nifti_header_class(head: bytes) -> type[nib.Nifti1Header] | type[nib.Nifti2Header]:
    for order in ("<", ">"):
        size = int(np.frombuffer(head[:4], dtype=f"{order}i4")[0]) if len(head) >= 4 else 0
        if size == 348:
            return nib.Nifti1Header
        if size == 540:
            return nib.Nifti2Header
    raise ScanError("not a NIfTI file (no NIfTI-1 or NIfTI-2 header)")


class NiftiFormat:
    """NIfTI-1/2 files, `.nii` or gzip-compressed `.nii.gz`, extensions in any letter case.

    Files are decompressed with ISA-L's gzip (`isal.igzip`, ~3x zlib's speed) and parsed by nibabel,
    which applies the header's scaling exactly as `nib.load` does.
    """

    name = "NIfTI"
    suffixes = (".nii.gz", ".nii")

    def claims_file(self, path: Path) -> bool:
        return path.name.lower().endswith(self.suffixes)

    def claims_folder(self, path: Path) -> bool:
        return False

    def stem(self, path: Path) -> str:
        lower = path.name.lower()
        suffix = next(s for s in self.suffixes if lower.endswith(s))
        return path.name[: -len(suffix)]

    @staticmethod
    def compressed(path: Path) -> bool:
        return path.name.lower().endswith(".gz")

    def _open(self, path: Path) -> io.BufferedIOBase:
        try:
            return igzip.open(path, "rb") if self.compressed(path) else open(path, "rb")  # noqa: SIM115
        except FileNotFoundError:
            raise ScanError("no such file") from None
        except OSError as exc:
            raise ScanError(f"cannot open it ({exc.strerror or exc})") from None

    def _read(self, path: Path, size: int = -1) -> bytes:
        with self._open(path) as stream:
            try:
                return stream.read(size)
            except igzip.BadGzipFile as exc:
                raise ScanError(f"not a readable NIfTI file (not gzip-compressed: {exc})") from None
            except (EOFError, OSError, ValueError) as exc:
                raise ScanError(f"truncated or corrupt gzip data ({exc})") from None

    def _parse_header(self, head: bytes) -> nib.Nifti1Header | nib.Nifti2Header:
        klass = _nifti_header_class(head)
        try:
            return klass.from_fileobj(io.BytesIO(head))
        except Exception as exc:  # nibabel raises several types for broken headers
            raise ScanError(f"not a readable NIfTI header ({exc})") from None

    @staticmethod
    def _geometry(header: nib.Nifti1Header | nib.Nifti2Header) -> Header:
        shape = tuple(int(s) for s in header.get_data_shape())
        while len(shape) > 3 and shape[-1] == 1:
            shape = shape[:-1]
        if len(shape) != 3:
            raise ScanError(f"expected a 3-D CT volume, got shape {list(header.get_data_shape())}")
        affine = np.asarray(header.get_best_affine(), dtype=np.float64)
        return Header(shape=shape, affine=affine)  # type: ignore[arg-type]

    def read_header(self, path: Path) -> Header:
        return self._geometry(self._parse_header(self._read(path, 540)))

    def read_volume(self, path: Path) -> Volume:
        raw = self._read(path)
        header = self._parse_header(raw[:540])
        geometry = self._geometry(header)
        voxels = int(np.prod(header.get_data_shape()))
        needed = int(header.get_data_offset()) + voxels * header.get_data_dtype().itemsize
        if len(raw) < needed:
            raise ScanError(f"truncated: {len(raw):,} bytes of image data where the header needs {needed:,}")
        klass = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
        try:
            image = klass.from_bytes(raw)
            data = np.asanyarray(image.dataobj)
        except Exception as exc:  # nibabel raises several types for unreadable data
            raise ScanError(f"not a readable NIfTI image ({exc})") from None
        del raw
        data = data.reshape(geometry.shape, order="F") if data.ndim != 3 else data
        return Volume(array=native_array(data), affine=geometry.affine, like=image)


def native_array(data: np.ndarray) -> np.ndarray:
    """The voxels in the type they travel in: int16 when exact, else float32 (HU).

    Integer data whose values fit int16 (int16 itself, uint8, int32 HU as some converters write)
    stays integer at half the bytes of float32; anything else becomes float32, as MONAI's reader
    gives it. Layout is kept (no copy for int16 data).
    """
    if data.dtype == np.int16:
        return data
    if np.issubdtype(data.dtype, np.integer) and data.size:
        low, high = int(data.min()), int(data.max())
        if -(2**15) <= low and high < 2**15:
            return data.astype(np.int16, order="K")
    return data if data.dtype == np.float32 else data.astype(np.float32, order="K")


FORMATS: tuple[ScanFormat, ...] = (NiftiFormat(),)


@dataclass(frozen=True)
class Scan:
    """One scan found among the inputs.

    `source` is the file (or, for a series, the folder); `relative` is where its outputs go under the
    output folder, without extension: its path relative to the inputs' common folder, its stem last.
    """

    source: Path
    relative: PurePath
    format: ScanFormat = field(compare=False)

    def read_header(self) -> Header:
        try:
            return self.format.read_header(self.source)
        except ScanError as exc:
            raise ScanError(f"{self.source}: {exc}") from None

    def read_volume(self) -> Volume:
        try:
            return self.format.read_volume(self.source)
        except ScanError as exc:
            raise ScanError(f"{self.source}: {exc}") from None
        except MemoryError:
            raise ScanError(f"{self.source}: not enough memory to read it") from None


@dataclass
class Discovery:
    scans: list[Scan]
    problems: list[str]  # one line each: a path and why it is not a scan


def _claim(path: Path, formats: Sequence[ScanFormat], folder: bool) -> ScanFormat | None:
    for fmt in formats:
        if fmt.claims_folder(path) if folder else fmt.claims_file(path):
            return fmt
    return None


def _unsupported(path: Path) -> str | None:
    lower = path.name.lower()
    for suffix, kind in UNSUPPORTED_SUFFIXES.items():
        if lower.endswith(suffix) or lower.endswith(suffix + ".gz"):
            return f"{path}: {kind} files are not supported; {CONVERT_HINT}"
    return None


def discover(
    paths: Iterable[Path], formats: Sequence[ScanFormat] = FORMATS, exclude: Sequence[Path] = ()
) -> Discovery:
    """Scans in `paths` (files, and folders searched recursively), in a stable sorted order.

    Hidden files and folders (`.name`, e.g. our own partial outputs) and anything under `exclude`
    (the output folder) are skipped; other files of folders that no format claims are ignored,
    except image formats this client cannot read, which are reported. A path given explicitly that
    is not a scan is reported. Each scan's `relative` mirrors its folder below the common folder of
    all `paths`, so two scans never share one (`a/s1/ct.nii.gz`, `a/s2/ct.nii.gz` -> `s1/ct`, `s2/ct`).
    The same file reached twice is kept once.
    """
    excluded = [Path(os.path.abspath(p)) for p in exclude]
    found: list[tuple[Path, ScanFormat]] = []
    problems: list[str] = []
    roots: list[Path] = []

    def is_excluded(path: Path) -> bool:
        return any(path == e or e in path.parents for e in excluded)

    for given in paths:
        path = Path(os.path.abspath(given))
        if path.is_dir():
            roots.append(path)
            fmt = _claim(path, formats, folder=True)
            if fmt is not None:
                found.append((path, fmt))
                continue
            before = len(found)
            for folder, dirs, files in os.walk(path):
                here = Path(folder)
                dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not is_excluded(here / d))
                for name in list(dirs):
                    fmt = _claim(here / name, formats, folder=True)
                    if fmt is not None:
                        found.append((here / name, fmt))
                        dirs.remove(name)
                for name in sorted(files):
                    if name.startswith("."):
                        continue
                    file = here / name
                    fmt = _claim(file, formats, folder=False)
                    if fmt is not None:
                        found.append((file, fmt))
                    elif (problem := _unsupported(file)) is not None:
                        problems.append(problem)
            if len(found) == before and not any(p.startswith(str(path)) for p in problems):
                problems.append(f"{given}: folder has no CT scans (.nii or .nii.gz files, any letter case)")
        elif path.is_file():
            roots.append(path.parent)
            fmt = _claim(path, formats, folder=False)
            if fmt is not None:
                found.append((path, fmt))
            else:
                problems.append(_unsupported(path) or f"{given}: not a NIfTI file (.nii or .nii.gz); {CONVERT_HINT}")
        else:
            problems.append(f"{given}: no such file or folder")
    if not found:
        return Discovery([], problems)
    common = Path(os.path.commonpath([str(r) for r in roots]))
    scans: dict[Path, Scan] = {}
    for source, fmt in found:
        real = Path(os.path.realpath(source))
        if real in scans:
            continue
        below = source.parent != common and common in source.parents
        parent = source.parent.relative_to(common) if below else PurePath()
        scans[real] = Scan(source=source, relative=PurePath(parent, fmt.stem(source)), format=fmt)
    return Discovery(sorted(scans.values(), key=lambda s: str(s.relative)), problems)

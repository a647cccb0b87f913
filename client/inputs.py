"""Finding and reading the scans of a cohort: files and folders in, `Scan`s and `Volume`s out.

A scan is whatever one CT volume is stored as: one NIfTI file (`.nii`, `.nii.gz`, any letter case),
or one CT series of a DICOM folder or .zip (`DicomFormat`: a folder or .zip holding several series
gives one scan per series). Discovery asks every format both about files and about folders
(`ScanFormat.claims_folder`); a format that finds several volumes in one source lists them with
`parts`. A format added later plugs in by being listed in `FORMATS`.

Reading is split in two so that a client can refuse a volume before allocating it: `read_header`
gives shape and affine from the first bytes, `read_volume` the voxels.
"""

from __future__ import annotations

import io
import os
import re
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Protocol

import nibabel as nib
import numpy as np
from isal import igzip

if TYPE_CHECKING:  # pydicom and clinical.dicom_series are imported by DicomFormat when a DICOM source is read
    from pydicom.dataset import Dataset

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
}
CONVERT_HINT = "convert it to NIfTI (.nii.gz), e.g. with SimpleITK or dcm2niix"
DICOM_FILE_HINT = "a DICOM file is one slice: give the folder (or .zip) holding its series"


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
    `like` is the source image (header and affine) that NIfTI label maps copy (for DICOM, a header
    made from the affine). `source_datasets` are a DICOM series' slice headers (no pixels) in Z
    order, what a DICOM-SEG references; None for other formats.
    """

    array: np.ndarray
    affine: np.ndarray
    like: nib.Nifti1Image | nib.Nifti2Image
    source_datasets: list[Dataset] | None = None


class ScanFormat(Protocol):
    """A way a CT volume is stored. Implementations: `NiftiFormat`, `DicomFormat`.

    A format whose sources may hold several volumes (a DICOM folder) also has
    `parts(path) -> list[tuple[str, str]]`: (part id, e.g. a SeriesInstanceUID; the part's output
    name), and its `read_header`/`read_volume` take that part id.
    """

    name: str

    def claims_file(self, path: Path) -> bool:
        """True if `path` (a file) is a whole scan in this format."""

    def claims_folder(self, path: Path) -> bool:
        """True if `path` (a folder) is one scan in this format (a DICOM series); its files are not scans."""

    def stem(self, path: Path) -> str:
        """The scan's name without its format's extension (`ct.nii.gz` -> `ct`), for output names."""

    def read_header(self, path: Path, part: str | None = None) -> Header:
        """Shape and affine without reading the voxels; raises ScanError."""

    def read_volume(self, path: Path, part: str | None = None) -> Volume:
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

    def read_header(self, path: Path, part: str | None = None) -> Header:
        return self._geometry(self._parse_header(self._read(path, 540)))

    def read_volume(self, path: Path, part: str | None = None) -> Volume:
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


def nifti_like(affine: np.ndarray) -> nib.Nifti1Image:
    """A NIfTI-1 image (1 voxel) whose header holds `affine` as sform and qform (code 1, scanner; mm),
    for label maps of volumes that come without a NIfTI header (DICOM). A sheared affine (gantry tilt)
    is exact in the sform; the qform, which cannot hold shear, gets its nearest rotation."""
    image = nib.Nifti1Image(np.zeros((1, 1, 1), np.int16), affine)
    image.header.set_sform(affine, code=1)
    image.header.set_qform(affine, code=1, strip_shears=True)
    image.header.set_xyzt_units("mm", "sec")
    return image


def _looks_like_dicom(path: Path) -> bool:
    """A Part-10 file (`DICM` at byte 128) or a file named *.dcm / *.ima / DICOMDIR."""
    lower = path.name.lower()
    if lower.endswith((".dcm", ".ima", ".dicom")) or lower == "dicomdir":
        return True
    try:
        with open(path, "rb") as stream:
            head = stream.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


class DicomFormat:
    """DICOM CT series, read with `clinical.dicom_series`: a folder whose own files include DICOM
    (the folder and all its sub-folders are read together, as a DICOMDIR export lays them out) or
    a `.zip` of DICOM files. Each CT series in it is one scan (part id = SeriesInstanceUID), named
    `series<SeriesNumber>` when the numbers are present and distinct, else by its UID, so two
    series of one folder never share an output. `series_uid` keeps only that series.
    """

    name = "DICOM"
    PROBE_FILES = 64  # files of a folder looked at to decide whether it is a DICOM folder

    def __init__(self, series_uid: str | None = None) -> None:
        self.series_uid = series_uid

    def claims_file(self, path: Path) -> bool:
        return path.name.lower().endswith(".zip") and zipfile.is_zipfile(path)

    def claims_folder(self, path: Path) -> bool:
        try:
            with os.scandir(path) as entries:
                names = sorted(e.name for e in entries if e.is_file() and not e.name.startswith("."))
        except OSError:
            return False
        candidates = [n for n in names if not n.lower().endswith(NiftiFormat.suffixes)]
        return any(_looks_like_dicom(path / n) for n in candidates[: self.PROBE_FILES])

    def stem(self, path: Path) -> str:
        return path.name[:-4] if path.name.lower().endswith(".zip") else path.name

    def parts(self, path: Path) -> list[tuple[str, str]]:
        from clinical import dicom_series

        try:
            found = dicom_series.find_ct_series(path)
        except dicom_series.DicomInputError as exc:
            raise ScanError(_without(path, exc)) from None
        if not found:
            raise ScanError("no CT image series (CT Image Storage, one file per slice) in it")
        numbers = [s.series_number for s in found]
        by_number = None not in numbers and len(set(numbers)) == len(numbers)
        names = [f"series{s.series_number}" if by_number else re.sub(r"[^A-Za-z0-9._-]+", "_", s.series_uid).strip("_")
                 for s in found]
        return [(s.series_uid, n) for s, n in zip(found, names) if self.series_uid in (None, s.series_uid)]

    def read_header(self, path: Path, part: str | None = None) -> Header:
        from clinical import dicom_series

        try:
            shape, affine = dicom_series.read_ct_geometry(path, self._part(path, part))
        except dicom_series.DicomInputError as exc:
            raise ScanError(_without(path, exc, part)) from None
        return Header(shape=shape, affine=affine)

    def read_volume(self, path: Path, part: str | None = None) -> Volume:
        from clinical import dicom_series

        try:
            series, = dicom_series.read_ct_series(path, series_uid=self._part(path, part))
        except dicom_series.DicomInputError as exc:
            raise ScanError(_without(path, exc, part)) from None
        return Volume(series.volume, series.affine, nifti_like(series.affine), series.datasets)

    def _part(self, path: Path, part: str | None) -> str:
        if part is not None:
            return part
        parts = self.parts(path)
        if len(parts) != 1:
            raise ScanError(f"holds {len(parts)} CT series; name one with its SeriesInstanceUID")
        return parts[0][0]


def _without(path: Path, exc: Exception, part: str | None = None) -> str:
    """The message of `exc` without a leading '<path>: ' or '<path>: series <part>: ' (Scan adds its own name)."""
    text = str(exc)
    for prefix in (f"{path}: series {part}: ", f"{path}: "):
        if text.startswith(prefix):
            return text[len(prefix):]
    return text


FORMATS: tuple[ScanFormat, ...] = (NiftiFormat(), DicomFormat())


@dataclass(frozen=True)
class Scan:
    """One scan found among the inputs.

    `source` is the file (or, for DICOM, the folder or .zip); `relative` is where its outputs go
    under the output folder, without extension: its path relative to the inputs' common folder, its
    stem last (for a DICOM series: the folder's path, then the series' name, e.g. `s1/dicom/series3`).
    `series_uid` is the DICOM series within `source` (None for a NIfTI file).
    """

    source: Path
    relative: PurePath
    format: ScanFormat = field(compare=False)
    series_uid: str | None = None

    @property
    def label(self) -> str:
        """How messages name the scan: its path, and the series for DICOM."""
        return str(self.source) if self.series_uid is None else f"{self.source} (series {self.series_uid})"

    def read_header(self) -> Header:
        try:
            return self.format.read_header(self.source, self.series_uid)
        except ScanError as exc:
            raise ScanError(f"{self.label}: {exc}") from None

    def read_volume(self) -> Volume:
        try:
            return self.format.read_volume(self.source, self.series_uid)
        except ScanError as exc:
            raise ScanError(f"{self.label}: {exc}") from None
        except MemoryError:
            raise ScanError(f"{self.label}: not enough memory to read it") from None


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
    if _looks_like_dicom(path):
        return f"{path}: {DICOM_FILE_HINT}"
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
    is not a scan is reported, and so is a claimed folder or file whose `parts` fail (a DICOM folder
    without a CT series); a source whose parts are all filtered out (DicomFormat's `series_uid`)
    gives no scan and no problem. Each scan's `relative` mirrors its folder below the common folder of
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
                problems.append(f"{given}: folder has no CT scans (.nii or .nii.gz files, any letter case, "
                                "or DICOM CT series)")
        elif path.is_file():
            roots.append(path.parent)
            fmt = _claim(path, formats, folder=False)
            if fmt is not None:
                found.append((path, fmt))
            else:
                problems.append(_unsupported(path) or f"{given}: not a NIfTI file (.nii or .nii.gz) or a .zip of a "
                                f"DICOM series; {CONVERT_HINT}")
        else:
            problems.append(f"{given}: no such file or folder")
    if not found:
        return Discovery([], problems)
    common = Path(os.path.commonpath([str(r) for r in roots]))
    scans: dict[tuple[Path, str | None], Scan] = {}
    for source, fmt in found:
        real = Path(os.path.realpath(source))
        below = source.parent != common and common in source.parents
        relative = PurePath(source.parent.relative_to(common) if below else PurePath(), fmt.stem(source))
        parts_of = getattr(fmt, "parts", None)
        if parts_of is None:
            if (real, None) not in scans:
                scans[(real, None)] = Scan(source=source, relative=relative, format=fmt)
            continue
        try:
            parts = parts_of(source)
        except ScanError as exc:
            problems.append(f"{source}: {exc}")
            continue
        for part, name in parts:
            if (real, part) not in scans:
                scans[(real, part)] = Scan(source=source, relative=relative / name, format=fmt, series_uid=part)
    return Discovery(sorted(scans.values(), key=lambda s: str(s.relative)), problems)

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

import hashlib
import io
import logging
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
from nibabel import volumeutils

if TYPE_CHECKING:  # pydicom and clinical.dicom_series are imported by DicomFormat when a DICOM source is read
    from pydicom.dataset import Dataset

log = logging.getLogger(__name__)

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
# NIfTI vox_offset accepted: the header and its extensions (a DICOM header, a JSON sidecar) stay far below
MAX_VOX_OFFSET = 64 * 2**20
CONVERT_HINT = "convert it to NIfTI (.nii.gz), e.g. with SimpleITK or dcm2niix"
DICOM_FILE_HINT = "a DICOM file is one slice: give the folder (or .zip) holding its series"
DICOM_SUFFIXES = (".dcm", ".ima", ".dicom")
# Pixel padding (scanners fill what lies outside the reconstructed field of view, e.g. -3024 HU): voxels
# equal to a DICOM series' PixelPaddingValue (to PixelPaddingRangeLimit); without the tag (NIfTI, or DICOM
# without it) voxels below PADDING_BELOW_HU, which no tissue or air reaches (air is about -1000 HU).
PADDING_BELOW_HU = -2000.0
AIR_HU = -1024  # what --padding-to-air sets padding voxels to


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
    made from the affine). `source_datasets` are a DICOM series' source image headers (no pixels),
    what a DICOM-SEG references (`clinical.dicom_series.DicomSeries.datasets`); None for other formats.
    `padding_hu`: per Z slice, the HU range of a DICOM series' PixelPaddingValue (None for a slice
    without the tag); None for other formats (see `measure_padding`).
    """

    array: np.ndarray
    affine: np.ndarray
    like: nib.Nifti1Image | nib.Nifti2Image
    source_datasets: list[Dataset] | None = None
    padding_hu: list[tuple[float, float] | None] | None = None
    padded_voxels: int | None = None  # set by measure_padding: the padding it found (before any to_air)

    def adopt(self, array: np.ndarray) -> None:
        """Hold `array`, the same voxels kept elsewhere (a client's shared-memory region, C order), instead
        of the own copy, which is freed unless referenced elsewhere. Raises ValueError for another shape."""
        if tuple(array.shape) != tuple(self.array.shape):
            raise ValueError(f"cannot adopt an array of shape {list(array.shape)} for {list(self.array.shape)}")
        if self.like.dataobj is self.array:  # the header image shares the voxels: let it share the new ones
            self.like = type(self.like)(array, self.like.affine, self.like.header)
        self.array = array


def measure_padding(volume: Volume, to_air: bool = False) -> int:
    """The number of padding voxels of `volume`; with `to_air`, they are set to AIR_HU (-1024) in place.

    Padding is, per Z slice, the HU range of the slice's PixelPaddingValue where the DICOM series gives
    one (`Volume.padding_hu`), else every voxel below PADDING_BELOW_HU (-2000 HU). The array keeps its
    dtype (int16 or float32); the comparison is made in that dtype, so the padding value the reader
    computed as slope x stored + intercept is matched exactly. The count is also kept in
    `volume.padded_voxels` (the quality checks' padded share, after the voxels were set to air).
    """
    array = volume.array
    ranges = volume.padding_hu or [None] * array.shape[2]
    count = 0
    for z in range(array.shape[2]):
        plane = array[:, :, z]
        limits = ranges[z]
        if limits is None:
            mask = plane < PADDING_BELOW_HU
        else:
            low, high = (array.dtype.type(v) for v in limits)
            mask = (plane >= low) & (plane <= high)
        found = int(np.count_nonzero(mask))
        if found and to_air:
            plane[mask] = AIR_HU
        count += found
    volume.padded_voxels = count
    return count


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

    def _read(self, path: Path, size: int) -> bytes:
        with self._open(path) as stream:
            return self._read_exactly(stream, size, allow_short=True)

    @staticmethod
    def _read_exactly(stream: io.BufferedIOBase, size: int, allow_short: bool = False) -> bytes:
        try:
            data = stream.read(size)
        except igzip.BadGzipFile as exc:
            raise ScanError(f"not a readable NIfTI file (not gzip-compressed: {exc})") from None
        except (EOFError, OSError, ValueError) as exc:
            raise ScanError(f"truncated or corrupt gzip data ({exc})") from None
        if len(data) < size and not allow_short:
            raise ScanError(f"truncated: the file ends before its header's {size:,} bytes")
        return data

    @staticmethod
    def _read_into(stream: io.BufferedIOBase, buffer: memoryview) -> int:
        """Fill `buffer` from `stream`; the number of bytes read (fewer only at the end of the data)."""
        filled = 0
        try:
            while filled < len(buffer):
                got = stream.readinto(buffer[filled:])
                if not got:
                    break
                filled += got
        except igzip.BadGzipFile as exc:
            raise ScanError(f"not a readable NIfTI file (not gzip-compressed: {exc})") from None
        except (EOFError, OSError, ValueError) as exc:
            raise ScanError(f"truncated or corrupt gzip data ({exc})") from None
        return filled

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
        if min(shape) < 1:  # would only fail later, in the server, as a bad request of another kind
            raise ScanError(f"corrupt header: shape {list(shape)} (a dimension below 1); re-export the CT")
        affine = np.asarray(header.get_best_affine(), dtype=np.float64)
        if not np.isfinite(affine).all() or abs(float(np.linalg.det(affine[:3, :3]))) < 1e-12:
            raise ScanError("corrupt header: the voxel geometry (pixdim or orientation) is NaN or zero; "
                            "re-export the CT")
        return Header(shape=shape, affine=affine)  # type: ignore[arg-type]

    def read_header(self, path: Path, part: str | None = None) -> Header:
        return self._geometry(self._parse_header(self._read(path, 540)))

    def read_volume(self, path: Path, part: str | None = None) -> Volume:
        """The voxels, read straight into their array: decompression stops at the size the header
        declares (a gzip bomb behind an honest header costs no memory), and a stream longer than that
        is refused as corrupt. Scaling (scl_slope/scl_inter) is nibabel's own `apply_read_scaling`.
        int16 data without scaling (the usual CT) is held once, in the file's (Fortran) order."""
        with self._open(path) as stream:
            head = self._read_exactly(stream, 540, allow_short=True)
            header = self._parse_header(head)
            geometry = self._geometry(header)
            offset = int(header.get_data_offset())
            if offset > MAX_VOX_OFFSET:
                raise ScanError(f"corrupt header: the image data start {offset:,} bytes in (vox_offset), past any "
                                f"header and extensions (at most {MAX_VOX_OFFSET:,} accepted); re-export the file")
            if offset > len(head):
                head += self._read_exactly(stream, offset - len(head))
            dtype = header.get_data_dtype()
            try:
                raw = np.empty(geometry.shape, dtype=dtype, order="F")
            except MemoryError:
                raise ScanError(f"not enough memory for {int(np.prod(geometry.shape)):,} voxels") from None
            flat = memoryview(raw.reshape(-1, order="F").view(np.uint8))  # the array's own bytes, file order
            lead = head[offset:]
            flat[: len(lead)] = lead[: len(flat)]
            filled = min(len(lead), len(flat)) + self._read_into(stream, flat[len(lead):])
            if filled < len(flat):
                raise ScanError(f"truncated: {offset + filled:,} bytes of image data where the header needs "
                                f"{offset + len(flat):,}")
            if len(lead) > len(flat) or self._read_exactly(stream, 1, allow_short=True):
                raise ScanError(f"corrupt: the data go on past the {offset + len(flat):,} bytes its header "
                                "declares; re-export the file")
        del flat
        if not dtype.isnative:
            raw = raw.astype(dtype.newbyteorder("="), order="F")
        slope, inter = header.get_slope_inter()
        data = volumeutils.apply_read_scaling(raw, slope, inter)
        del raw
        array = native_array(data)
        del data
        klass = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
        # the header (affine, units, codes) that label maps copy; the array is the volume's own, not a copy
        like = klass(array, geometry.affine, header)
        return Volume(array=array, affine=geometry.affine, like=like)


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


def _looks_like_dicom(path: Path, probe: bool = False) -> bool:
    """A Part-10 file (`DICM` at byte 128) or a file named *.dcm / *.ima / *.dicom / DICOMDIR; with
    `probe`, also a file without preamble or extension (old exports) that starts with a DICOM element of
    group 0002, 0008 or 0010 and that pydicom reads as an image (`clinical.dicom_series.is_dicom_file`,
    which loads pydicom: only files passing the byte check get that far)."""
    lower = path.name.lower()
    if lower.endswith(DICOM_SUFFIXES) or lower == "dicomdir":
        return True
    try:
        with open(path, "rb") as stream:
            head = stream.read(132)
    except OSError:
        return False
    if head[128:132] == b"DICM":
        return True
    if not probe or len(head) < 8 or head[:2] not in (b"\x02\x00", b"\x08\x00", b"\x10\x00", b"\x00\x08"):
        return False
    from clinical.dicom_series import is_dicom_file

    return is_dicom_file(path)


class DicomFormat:
    """DICOM CT series, read with `clinical.dicom_series`: a folder whose own files include DICOM
    (the folder and all its sub-folders are read together, as a DICOMDIR export lays them out), a
    `.zip` of DICOM files, or one multi-frame (enhanced) CT file. Each CT series in it is one scan
    (part id = SeriesInstanceUID, or "no SeriesInstanceUID[ in <folder>]" for files without one), named
    `series<SeriesNumber>` when the numbers are present and distinct, else by its UID, else (no UID)
    `series-<8 hex digits of the SHA-256 of its part id>`: never a machine path, and two series of one
    folder never share an output. `series_uid` keeps only that series.

    A folder is DICOM when one of its first PROBE_FILES files (NIfTI files aside) has a DICOM name or
    the Part-10 `DICM` marker, or, failing that, one of its first PROBE_FORCED files that start like a
    DICOM data set is read by pydicom (old exports without preamble or extension).
    """

    name = "DICOM"
    PROBE_FILES = 64  # files of a folder looked at (first bytes only) to decide whether it is a DICOM folder
    PROBE_FORCED = 4  # of those, files without the DICM marker that pydicom is asked to parse

    def __init__(self, series_uid: str | None = None) -> None:
        self.series_uid = series_uid

    def claims_file(self, path: Path) -> bool:
        lower = path.name.lower()
        if lower.endswith(".zip"):
            return zipfile.is_zipfile(path)
        if not _looks_like_dicom(path, probe=True):
            return False
        from clinical import dicom_series  # a lone file is a scan only as a multi-frame CT (a whole volume)

        try:
            return any(s.multiframe for s in dicom_series.survey(path).series)
        except dicom_series.DicomInputError:
            return False

    def claims_folder(self, path: Path) -> bool:
        try:
            with os.scandir(path) as entries:
                names = sorted(e.name for e in entries if e.is_file() and not e.name.startswith("."))
        except OSError:
            return False
        candidates = [path / n for n in names if not n.lower().endswith(NiftiFormat.suffixes)][: self.PROBE_FILES]
        if any(_looks_like_dicom(c) for c in candidates):
            return True
        return any(_looks_like_dicom(c, probe=True) for c in candidates[: self.PROBE_FORCED])

    def stem(self, path: Path) -> str:
        lower = path.name.lower()
        for suffix in (".zip", *DICOM_SUFFIXES):
            if lower.endswith(suffix) and len(path.name) > len(suffix) and path.is_file():
                return path.name[: -len(suffix)]
        return path.name

    def parts(self, path: Path) -> list[tuple[str, str]]:
        from clinical import dicom_series

        try:
            found = dicom_series.survey(path)
        except dicom_series.DicomInputError as exc:
            raise ScanError(_without(path, exc)) from None
        for note in found.notes:  # once per source: discovery asks each source once
            log.info("%s", note)
        if not found.series:
            raise ScanError(f"no CT image series in it ({found.contents}); CT Image Storage (one file per slice) "
                            "and Enhanced / Legacy Converted Enhanced CT are read")
        numbers = [s.series_number for s in found.series]
        by_number = None not in numbers and len(set(numbers)) == len(numbers)

        def name(s: dicom_series.SeriesInfo) -> str:
            if by_number:
                return f"series{s.series_number}"
            if s.series_uid.startswith(dicom_series.NO_SERIES_UID):
                return f"series-{hashlib.sha256(s.series_uid.encode()).hexdigest()[:8]}"
            return re.sub(r"[^A-Za-z0-9._-]+", "_", s.series_uid).strip("_")

        return [(s.series_uid, name(s)) for s in found.series if self.series_uid in (None, s.series_uid)]

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
        return Volume(series.volume, series.affine, nifti_like(series.affine), series.datasets, series.padding_hu)

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


@dataclass(frozen=True)
class Identity:
    """What a scan's bytes are, to tell whether an output was made from this very input.

    `sha256` is the hex SHA-256 of the source file's bytes (a NIfTI file, a .zip), or, for a DICOM
    folder, of every file below it (relative path, then bytes, in sorted path order); `size` is the
    bytes hashed. Two inputs with equal identities are the same data wherever they lie.
    """

    sha256: str
    size: int


HASH_CHUNK = 1 << 20  # bytes read at a time while hashing


def source_identity(source: Path) -> Identity:
    """The `Identity` of a scan's source (file or folder). Raises ScanError naming the file it cannot read."""
    digest = hashlib.sha256()
    size = 0
    if source.is_dir():
        files = sorted((p for p in source.rglob("*") if p.is_file()), key=lambda p: p.relative_to(source).as_posix())
    else:
        files = [source]
    buffer = bytearray(HASH_CHUNK)
    view = memoryview(buffer)
    for file in files:
        if file is not source:
            digest.update(file.relative_to(source).as_posix().encode() + b"\0")
        try:
            with open(file, "rb", buffering=0) as stream:
                while got := stream.readinto(buffer):
                    digest.update(view[:got])
                    size += got
        except OSError as exc:
            raise ScanError(f"{file}: cannot read it ({exc.strerror or exc})") from None
    return Identity(digest.hexdigest(), size)


@dataclass
class Discovery:
    scans: list[Scan]
    problems: list[str]  # one line each: a path that should have been a scan and why it is not (errors)
    skipped: list[str] = field(default_factory=list)  # one line each: a path not taken and why (not errors)


# files this client itself leaves in an output folder (partial writes, write probes, the run lock)
OWN_FILES = re.compile(r"^\.(.*\.partial|write-test-.*|segmentation\.lock)$")


def _claim(path: Path, formats: Sequence[ScanFormat], folder: bool) -> ScanFormat | None:
    for fmt in formats:
        if fmt.claims_folder(path) if folder else fmt.claims_file(path):
            return fmt
    return None


def _unsupported(path: Path) -> str | None:
    lower = path.name.lower()
    if _looks_like_dicom(path, probe=True):
        return f"{path}: {DICOM_FILE_HINT}"
    for suffix, kind in UNSUPPORTED_SUFFIXES.items():
        if lower.endswith(suffix) or lower.endswith(suffix + ".gz"):
            return f"{path}: {kind} files are not supported; {CONVERT_HINT}"
    return None


def discover(
    paths: Iterable[Path], formats: Sequence[ScanFormat] = FORMATS, exclude: Sequence[Path] = ()
) -> Discovery:
    """Scans in `paths` (files, and folders searched recursively), in a stable sorted order.

    Symbolic links to folders and files are followed; a folder reached a second time (a link loop, or
    two links to one folder) is searched once. Every path not taken is named once: image formats this
    client cannot read, broken links, unreadable folders and a path given explicitly that is not a scan
    are `problems`; hidden files and folders (`.name`), other files, the folders under `exclude` (the
    output folder) and folders searched already are `skipped`, one line each (the client's own partial
    outputs are left out). A claimed folder or file whose `parts` fail (a DICOM folder without a CT
    series) is a problem; a source whose parts are all filtered out (DicomFormat's `series_uid`) gives no
    scan and no line. Each scan's `relative` mirrors its folder below the common folder of all `paths`,
    so two scans never share one (`a/s1/ct.nii.gz`, `a/s2/ct.nii.gz` -> `s1/ct`, `s2/ct`). The same
    file reached twice is kept once.
    """
    excluded = [Path(os.path.abspath(p)) for p in exclude]
    found: list[tuple[Path, ScanFormat]] = []
    problems: list[str] = []
    skipped: list[str] = []
    roots: list[Path] = []
    searched: dict[tuple[int, int], Path] = {}  # (device, inode) of every folder searched -> its path

    excluded += [Path(os.path.realpath(p)) for p in exclude]

    def is_excluded(path: Path) -> bool:  # also through a symbolic link to the output folder
        return any(p == e or e in p.parents for p in (path, Path(os.path.realpath(path))) for e in excluded)

    def claim_folder(folder: Path, fmt: ScanFormat) -> None:
        """A folder one format reads whole (a DICOM series): it, and any file in it another format claims
        (a NIfTI CT beside the DICOM files), which that format would not read."""
        found.append((folder, fmt))
        for inner, _, names in os.walk(folder, followlinks=True):
            for name in sorted(names):
                other = _claim(Path(inner) / name, [f for f in formats if f is not fmt], folder=False)
                if other is not None and not name.startswith(".") and not is_excluded(Path(inner) / name):
                    found.append((Path(inner) / name, other))

    def unreadable(error: OSError) -> None:
        problems.append(f"{error.filename}: cannot read this folder ({error.strerror}); its scans are not segmented")

    for given in paths:
        path = Path(os.path.abspath(given))
        if path.is_dir():
            roots.append(path)
            fmt = _claim(path, formats, folder=True)
            if fmt is not None:
                claim_folder(path, fmt)
                continue
            before = len(found)
            for folder, dirs, files in os.walk(path, onerror=unreadable, followlinks=True):
                here = Path(folder)
                try:
                    status = os.stat(here)
                except OSError as exc:
                    problems.append(f"{here}: cannot read this folder ({exc.strerror})")
                    dirs[:] = []
                    continue
                key = (status.st_dev, status.st_ino)
                if key in searched:
                    first = searched[key]
                    if first == here:
                        why = "searched already (given twice, or inside another input)"
                    elif first in here.parents:
                        why = f"a symbolic link loop back to {first}, searched once"
                    else:
                        why = f"the same folder as {first}, searched once"
                    skipped.append(f"{here}: skipped, {why}")
                    dirs[:] = []
                    continue
                searched[key] = here
                keep = []
                for name in sorted(dirs):
                    sub = here / name
                    if name.startswith("."):
                        skipped.append(f"{sub}: skipped, a hidden folder")
                    elif is_excluded(sub):
                        skipped.append(f"{sub}: skipped, the output folder")
                    elif (fmt := _claim(sub, formats, folder=True)) is not None:
                        claim_folder(sub, fmt)
                    else:
                        keep.append(name)
                dirs[:] = keep
                for name in sorted(files):
                    file = here / name
                    if OWN_FILES.match(name):
                        continue
                    if name.startswith("."):
                        skipped.append(f"{file}: skipped, a hidden file")
                    elif not file.exists():
                        problems.append(f"{file}: a broken symbolic link (to {os.readlink(file)}); fix or remove it")
                    elif (fmt := _claim(file, formats, folder=False)) is not None:
                        found.append((file, fmt))
                    elif (problem := _unsupported(file)) is not None:
                        problems.append(problem)
                    else:
                        skipped.append(f"{file}: skipped, not a CT scan (.nii/.nii.gz, a DICOM series or its .zip)")
            again = any(line.startswith(f"{path}: skipped, searched already") for line in skipped)
            if len(found) == before and not again and not any(p.startswith(str(path)) for p in problems):
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
        elif path.is_symlink():
            problems.append(f"{given}: a broken symbolic link (to {os.readlink(path)}); fix or remove it")
        else:
            problems.append(f"{given}: no such file or folder")
    if not found:
        return Discovery([], problems, skipped)
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
    return Discovery(sorted(scans.values(), key=lambda s: str(s.relative)), problems, skipped)

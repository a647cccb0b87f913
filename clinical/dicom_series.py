"""DICOM CT series in: a folder or a .zip of files -> volume [X, Y, Z] in HU and its RAS affine.

The volume has nibabel's voxel order for a DICOM series: X = column index within a slice, Y = row
index, Z = slice index in ascending position along the slice normal (row cosine x column cosine).
The affine maps (X, Y, Z, 1) to RAS mm:

    LPS = ImagePositionPatient[first] + X * PixelSpacing[1] * row cosine
                                      + Y * PixelSpacing[0] * column cosine
                                      + Z * (position[last] - position[first]) / (slices - 1)
    RAS = diag(-1, -1, 1) @ LPS

Read: CT Image Storage (one file per slice), and Enhanced CT and Legacy Converted Enhanced CT Image
Storage (multi-frame: each frame is a slice, its position, orientation, pixel spacing and rescale taken
from the frame's functional groups, per-frame or shared: PlanePositionSequence,
PlaneOrientationSequence, PixelMeasuresSequence, PixelValueTransformationSequence). Files without the
Part-10 preamble (old exports) and without an extension are read too. Files are grouped by
SeriesInstanceUID; files without one (badly anonymised) by folder, keyed "no SeriesInstanceUID" or
"no SeriesInstanceUID in <folder relative to the input>" (never a machine path).

A series is assembled as a careful converter (dcm2niix) does, and says what it left out, one line each
(`DicomSeries.notes`, `survey(...).notes`):

- an exact duplicate (the same SOPInstanceUID, or for anonymised files the same position and instance
  number, with the same file bytes or the same decoded pixel values) is dropped, naming both files;
- localizer images (ImageType or FrameType LOCALIZER) are skipped, counted in one line;
- images that do not fit the series' geometry are set aside, each named: the series' geometry is that of
  most of its images (rows x columns, orientation, pixel spacing); the others (an untagged scout, a
  reformat of another orientation, an image lacking its position) are left out, and so is the odd one
  out by ImageType (a DERIVED image among ORIGINAL ones, or the reverse, whichever is fewer);
- objects that are not CT images (MR, RTSTRUCT, SR, SEG, secondary captures...) are skipped, one line per
  kind and series with its number of files.

A series whose remaining slices are not evenly spaced (a missing slice, mixed spacings, several
acquisitions at one position) is refused with one line naming the series and the spread (files and
positions counted apart); resample or split it with the scanner's or PACS's tools first. A gantry-tilted
series keeps its slices' own positions, so its affine is sheared (the third column is not along the
slice normal): that is the exact geometry of the voxels, and no resampling happens here.

Pixel data are decoded by pydicom and its plugins (pylibjpeg-openjpeg: JPEG 2000, pylibjpeg-libjpeg:
JPEG lossless/baseline, pylibjpeg-rle or pydicom's own: RLE; python-gdcm where installed). Values are
RescaleSlope * stored + RescaleIntercept per slice (per frame): int16 when every value is an integer
within int16 (no information lost), float32 otherwise. Pixel padding (PixelPaddingValue, up to
PixelPaddingRangeLimit) is passed through as its HU value, as dcm2niix does; `DicomSeries.padding_hu`
gives its HU range per slice so that a caller can measure or replace it.

`write_ct_series` does the reverse (CT Image Storage, one file per slice) for tests, demos and
PACS uploads of NIfTI volumes.
"""

from __future__ import annotations

import io
import logging
import struct
import warnings
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (UID, CTImageStorage, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                         generate_uid)

log = logging.getLogger(__name__)

ENHANCED_CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_ENHANCED_CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2.2"
MULTIFRAME_CT_STORAGE = (ENHANCED_CT_STORAGE, LEGACY_ENHANCED_CT_STORAGE)
CT_STORAGE = (str(CTImageStorage), *MULTIFRAME_CT_STORAGE)
DICOMDIR_STORAGE = "1.2.840.10008.1.3.10"
NO_SERIES_UID = "no SeriesInstanceUID"  # the key of a series whose files lack one (see `_series_key`)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# slice positions may deviate this much (fraction of the slice spacing) from an even grid: DICOM
# decimal strings and scanners round positions (e.g. to 0.01 mm); a missing slice deviates by 1.0
SPACING_TOLERANCE = 0.1
ORIENTATION_TOLERANCE = 1e-4  # of the direction cosines, between the slices of one series
PIXEL_SPACING_TOLERANCE = 1e-4  # mm, between the slices of one series
SAME_POSITION_MM = 1e-3  # two slices closer than this along the normal are at one position

Opener = Callable[[], BinaryIO]


class DicomInputError(ValueError):
    """A DICOM input that cannot be made into a CT volume; the message is one line naming the input and the fix."""


@dataclass
class DicomSeries:
    """One CT series read into memory.

    volume: [X, Y, Z] int16 (exact) or float32, HU. affine: [4, 4] float64, voxel -> RAS mm.
    datasets: the source images' headers (no pixel data), what a DICOM-SEG references: for single-frame
    CT one per slice in Z order; for a multi-frame (enhanced) CT each instance once, in the Z order of
    its first frame (`multiframe` is True). notes: one line per duplicate dropped or image set aside.
    padding_hu: per Z slice, the (low, high) HU range of its PixelPaddingValue (..PixelPaddingRangeLimit),
    None for a slice without the tag.
    """

    series_uid: str
    study_uid: str
    volume: np.ndarray
    affine: np.ndarray
    datasets: list[Dataset] = field(repr=False)
    source: str = ""
    description: str = ""
    multiframe: bool = False
    notes: list[str] = field(default_factory=list, repr=False)
    padding_hu: list[tuple[float, float] | None] = field(default_factory=list, repr=False)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel spacing in mm along X, Y, Z (Z: between slice positions, along the third affine column)."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def sheared(self) -> bool:
        """True for gantry tilt: the slice step is not along the slice normal."""
        cols = self.affine[:3, :3] / np.linalg.norm(self.affine[:3, :3], axis=0)
        return abs(float(np.dot(cols[:, 2], np.cross(cols[:, 0], cols[:, 1])))) < 1 - 1e-6


@dataclass
class _File:
    name: str  # for messages: path, or zip path + member
    header: Dataset
    opener: Opener  # returns a binary file object of the whole file


@dataclass
class _Slice:
    """One image of a series: a single-frame file, or one frame of a multi-frame file.

    position: ImagePositionPatient (3 floats, mm, LPS); orientation: ImageOrientationPatient (6 floats);
    spacing: PixelSpacing (between rows, between columns; mm); None where the file lacks it."""

    file: _File
    frame: int | None  # 0-based frame of a multi-frame file, None for a single-frame file
    position: np.ndarray | None
    orientation: np.ndarray | None
    spacing: np.ndarray | None
    rows: int | None
    columns: int | None
    slope: float
    intercept: float
    image_type: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.file.name if self.frame is None else f"{self.file.name} frame {self.frame + 1}"

    @property
    def header(self) -> Dataset:
        return self.file.header


def _iter_files(path: Path) -> Iterator[tuple[str, str, Opener]]:
    """(display name, path relative to `path` in POSIX form, opener) for every file of a folder
    (recursively), a .zip, or `path` itself when it is one file."""
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            yield str(f), f.relative_to(path).as_posix(), (lambda f=f: open(f, "rb"))
    elif zipfile.is_zipfile(path):
        def member(name: str) -> io.BytesIO:  # the archive is opened per read: no handle outlives a call
            with zipfile.ZipFile(path) as archive:
                return io.BytesIO(archive.read(name))

        with zipfile.ZipFile(path) as archive:
            names = [info.filename for info in archive.infolist() if not info.is_dir()]
        for name in names:
            yield f"{path}:{name}", name, (lambda n=name: member(n))
    elif path.is_file():
        yield str(path), path.name, (lambda: open(path, "rb"))
    else:
        raise DicomInputError(f"{path}: no such file or folder; give a folder or a .zip of DICOM files")


def _read_header(opener: Opener) -> Dataset | None:
    """The header of a DICOM file, also of one without the Part-10 preamble (old exports); None if not DICOM."""
    for force in (False, True):
        try:
            with opener() as f, warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pydicom's warnings about a forced read of a non-DICOM file
                header = pydicom.dcmread(f, stop_before_pixels=True, force=force)
        except InvalidDicomError:
            continue
        except (EOFError, ValueError, KeyError, TypeError, OSError, struct.error):
            return None
        if not force:
            return header
        # a forced read parses anything: keep it only if it looks like an image slice
        try:
            if "Modality" in header and "SeriesInstanceUID" in header and (
                    "ImagePositionPatient" in header or "PerFrameFunctionalGroupsSequence" in header):
                return header
        except Exception:  # noqa: BLE001 - garbage parsed as elements fails on access
            return None
    return None


def is_dicom_file(path: str | Path) -> bool:
    """True if pydicom reads `path` as a DICOM image or object, with or without the Part-10 preamble."""
    return _read_header(lambda: open(path, "rb")) is not None


def _series_key(header: Dataset, relative: str) -> str:
    uid = str(header.get("SeriesInstanceUID", "") or "")
    if uid:
        return uid
    folder = str(PurePosixPath(relative).parent)  # badly anonymised: one series per folder
    return NO_SERIES_UID if folder in ("", ".") else f"{NO_SERIES_UID} in {folder}"


@dataclass
class _Survey:
    """What a folder or .zip holds: CT series ready to assemble, and everything left out."""

    series: dict[str, list[_Slice]]
    skipped: dict[tuple[str, str, str], int]  # (modality, SOP class name, series key) -> files: not CT images
    not_dicom: int  # files that are not DICOM, and DICOMDIR indexes
    localizers: int
    notes: dict[str, list[str]]  # series key -> one line per duplicate dropped or image set aside


def _scan(path: Path) -> _Survey:
    """Every DICOM file's header, grouped by series; duplicates dropped, odd images set aside."""
    files: dict[str, list[_File]] = {}
    skipped: Counter[tuple[str, str, str]] = Counter()
    not_dicom = 0
    for name, relative, opener in _iter_files(path):
        header = _read_header(opener)
        if header is None:
            log.debug("skipping %s: not DICOM", name)
            not_dicom += 1
            continue
        meta = header.file_meta if "file_meta" in dir(header) else Dataset()
        sop_class = str(header.get("SOPClassUID", "") or "")
        if not sop_class and meta.get("MediaStorageSOPClassUID"):  # anonymisers drop it; the file meta keeps it
            sop_class = header.SOPClassUID = str(meta.MediaStorageSOPClassUID)
        if sop_class == DICOMDIR_STORAGE:
            not_dicom += 1
            continue
        if not header.get("SOPInstanceUID") and meta.get("MediaStorageSOPInstanceUID"):
            header.SOPInstanceUID = str(meta.MediaStorageSOPInstanceUID)
        key = _series_key(header, relative)
        modality = str(header.get("Modality", "") or "")
        if sop_class not in CT_STORAGE or modality != "CT":
            skipped[(modality or "no modality", UID(sop_class).name if sop_class else "no SOP class", key)] += 1
            continue
        files.setdefault(key, []).append(_File(name, header, opener))
    series: dict[str, list[_Slice]] = {}
    notes: dict[str, list[str]] = {}
    localizers = 0
    for key, members in files.items():
        lines = notes.setdefault(key, [])
        slices = [s for f in _drop_duplicates(members, lines) for s in _slices(f)]
        kept = [s for s in slices if "LOCALIZER" not in s.image_type]
        for s in slices:
            if "LOCALIZER" in s.image_type:
                log.debug("%s: skipping a localizer image", s.name)  # counted once per source in survey()
        localizers += len(slices) - len(kept)
        kept = _fit(key, kept, lines)
        if kept:
            series[key] = kept
    return _Survey(series, dict(skipped), not_dicom, localizers, notes)


def _floats(item: Dataset | None, key: str, count: int) -> np.ndarray | None:
    """`count` floats of element `key` of `item`, None when absent, empty or malformed."""
    if item is None or key not in item:
        return None
    try:
        values = np.asarray([float(v) for v in item[key].value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return values if values.shape == (count,) and np.all(np.isfinite(values)) else None


def _int(value: object) -> int | None:
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


def _rescale(item: Dataset | None) -> tuple[float | None, float | None]:
    if item is None:
        return None, None
    slope, intercept = item.get("RescaleSlope"), item.get("RescaleIntercept")
    return (float(slope) if slope not in (None, "") else None,
            float(intercept) if intercept not in (None, "") else None)


def _group(header: Dataset, frame: int, name: str) -> Dataset | None:
    """The first item of functional group `name` for `frame` (0-based): per-frame, else shared; None if neither."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        sequence = header.get(groups)
        if sequence is not None and len(sequence) > index:
            item = sequence[index].get(name)
            if item is not None and len(item) > 0:
                return item[0]
    return None


def _slices(f: _File) -> list[_Slice]:
    """The images of one file: itself (single-frame CT) or each of its frames (enhanced CT)."""
    h = f.header
    image_type = tuple(str(v).upper() for v in (h.get("ImageType") or []))
    rows, columns = _int(h.get("Rows")), _int(h.get("Columns"))
    top_slope, top_intercept = _rescale(h)
    if str(h.get("SOPClassUID", "")) not in MULTIFRAME_CT_STORAGE:
        return [_Slice(f, None, _floats(h, "ImagePositionPatient", 3), _floats(h, "ImageOrientationPatient", 6),
                       _floats(h, "PixelSpacing", 2), rows, columns, top_slope if top_slope is not None else 1.0,
                       top_intercept or 0.0, image_type)]
    out = []
    for frame in range(_int(h.get("NumberOfFrames")) or 1):
        frame_type = _group(h, frame, "CTImageFrameTypeSequence")
        types = tuple(str(v).upper() for v in (frame_type.get("FrameType") or [])) if frame_type else image_type
        position = _group(h, frame, "PlanePositionSequence")
        orientation = _group(h, frame, "PlaneOrientationSequence")
        measures = _group(h, frame, "PixelMeasuresSequence")
        slope, intercept = _rescale(_group(h, frame, "PixelValueTransformationSequence"))
        slope = slope if slope is not None else top_slope
        intercept = intercept if intercept is not None else top_intercept
        out.append(_Slice(f, frame, _floats(position, "ImagePositionPatient", 3),
                          _floats(orientation, "ImageOrientationPatient", 6), _floats(measures, "PixelSpacing", 2),
                          rows, columns, slope if slope is not None else 1.0, intercept or 0.0, types))
    return out


def _drop_duplicates(files: list[_File], notes: list[str]) -> list[_File]:
    """`files` without exact duplicates: a file with the SOPInstanceUID of an earlier one (for files
    without one: the same position and InstanceNumber) and the same bytes or decoded pixel values.
    Two files claiming one SOPInstanceUID with other pixel values are both kept, with a note."""
    seen: dict[tuple[str, ...], _File] = {}
    kept = []
    for f in files:
        h = f.header
        uid = str(h.get("SOPInstanceUID", "") or "")
        position = _floats(h, "ImagePositionPatient", 3)
        key: tuple[str, ...] | None = None
        if uid:
            key = ("sop", uid)
        elif position is not None:  # anonymised away: the same place and number
            key = ("at", str(np.round(position, 3).tolist()), str(h.get("InstanceNumber", "")))
        first = seen.get(key) if key is not None else None
        if first is None:
            if key is not None:
                seen[key] = f
            kept.append(f)
            continue
        same = _same_image(first, f)
        if same:
            notes.append(f"{f.name}: dropped, {same}")
            continue
        if uid:
            notes.append(f"{f.name}: has the SOPInstanceUID of {first.name} but other pixel values; both kept")
        kept.append(f)
    return kept


def _same_image(a: _File, b: _File) -> str | None:
    """How `b` repeats `a` ("a copy of a": the same bytes; "the same image as a ...": the same pixel values,
    rescale and position, encoded otherwise), None if it does not. Files that cannot be read are not the same."""
    try:
        with a.opener() as fa, b.opener() as fb:
            if fa.read() == fb.read():
                return f"a copy of {a.name}"
        pixels_a, pixels_b = _dataset(a).pixel_array, _dataset(b).pixel_array
    except Exception as exc:  # noqa: BLE001 - not comparable: both are kept, and reading names a broken one
        log.debug("comparing %s with %s: %s", a.name, b.name, exc)
        return None
    same_place = all(np.array_equal(_floats(a.header, k, n), _floats(b.header, k, n))
                     for k, n in (("ImagePositionPatient", 3), ("ImageOrientationPatient", 6)))
    if same_place and _rescale(a.header) == _rescale(b.header) and np.array_equal(pixels_a, pixels_b):
        return f"the same image as {a.name}, encoded otherwise"
    return None


def _plane(orientation: np.ndarray) -> str:
    """axial, coronal, sagittal or oblique: the patient axis the slice normal is closest to."""
    normal = np.abs(np.cross(orientation[:3], orientation[3:]))
    axis = int(np.argmax(normal))
    return ("sagittal", "coronal", "axial")[axis] if normal[axis] > 0.9 else "oblique"


def _fit(key: str, slices: list[_Slice], notes: list[str]) -> list[_Slice]:
    """The images of a series that share its geometry (rows x columns, orientation, pixel spacing: the
    geometry of most of them) and its ImageType (ORIGINAL/DERIVED: the more common one); every other
    image is set aside with one line in `notes`. Left as they are when no geometry is held by most."""
    if len(slices) < 3:
        return slices
    known = [s for s in slices if s.position is not None and s.orientation is not None and s.spacing is not None
             and s.rows is not None and s.columns is not None]
    groups: list[list[_Slice]] = []
    for s in known:
        for group in groups:
            g = group[0]
            if ((s.rows, s.columns) == (g.rows, g.columns)
                    and np.allclose(s.orientation, g.orientation, atol=ORIENTATION_TOLERANCE)
                    and np.allclose(s.spacing, g.spacing, atol=PIXEL_SPACING_TOLERANCE)):
                group.append(s)
                break
        else:
            groups.append([s])
    groups.sort(key=len, reverse=True)
    if not groups or len(groups[0]) < 2 or (len(groups) > 1 and len(groups[1]) == len(groups[0])):
        return slices  # no majority: `_geometry` refuses the mixed series, naming the geometries
    main = groups[0]
    g = main[0]
    assert g.orientation is not None and g.spacing is not None
    in_main, in_known = {id(s) for s in main}, {id(s) for s in known}
    for s in slices:
        if id(s) in in_main:
            continue
        if id(s) not in in_known:
            fields = (("ImagePositionPatient", s.position), ("ImageOrientationPatient", s.orientation),
                      ("PixelSpacing", s.spacing), ("Rows", s.rows), ("Columns", s.columns))
            missing = [k for k, v in fields if v is None]
            why = f"it lacks {', '.join(missing)}"
        elif (s.rows, s.columns) != (g.rows, g.columns):
            why = f"{s.rows}x{s.columns} pixels where the series' {len(main)} images have {g.rows}x{g.columns}"
        elif not np.allclose(s.orientation, g.orientation, atol=ORIENTATION_TOLERANCE):
            assert s.orientation is not None
            why = f"{_plane(s.orientation)} where the series' {len(main)} images are {_plane(g.orientation)}"
        else:
            assert s.spacing is not None
            why = (f"pixel spacing {s.spacing[0]:g} x {s.spacing[1]:g} mm where the series' {len(main)} images have "
                   f"{g.spacing[0]:g} x {g.spacing[1]:g} mm")
        notes.append(f"{s.name}: set aside ({why}: a scout or another reconstruction?); series {key} is read "
                     "without it")
    kinds = Counter(s.image_type[0] if s.image_type else "" for s in main)
    if kinds["ORIGINAL"] and kinds["DERIVED"]:
        odd = "DERIVED" if kinds["DERIVED"] <= kinds["ORIGINAL"] else "ORIGINAL"
        usual = "ORIGINAL" if odd == "DERIVED" else "DERIVED"
        for s in main:
            if s.image_type[:1] == (odd,):
                notes.append(f"{s.name}: set aside (a {odd} image among {kinds[usual]} {usual} ones); series {key} "
                             "is read without it")
        main = [s for s in main if s.image_type[:1] != (odd,)]
    return main


@dataclass(frozen=True)
class SeriesInfo:
    """What a folder or .zip says of one of its CT series, from the headers alone (no pixel data)."""

    series_uid: str  # SeriesInstanceUID, or "no SeriesInstanceUID[ in <folder>]" for files lacking it
    study_uid: str
    series_number: int | None  # SeriesNumber, None when absent
    description: str  # SeriesDescription
    slices: int  # images kept (frames of a multi-frame CT), duplicates, localizers and images set aside left out
    multiframe: bool = False  # Enhanced or Legacy Converted Enhanced CT


@dataclass(frozen=True)
class Survey:
    """A folder's or .zip's CT series and one line per thing left out of them (what `find_ct_series` logs)."""

    series: list[SeriesInfo]
    notes: list[str]  # duplicates dropped, images set aside, localizers, other objects and non-DICOM files skipped
    contents: str  # what it holds besides CT series, for a message: e.g. "1 MR series (24 files), 2 other files"


def survey(path: str | Path) -> Survey:
    """The CT series of a folder (recursively), .zip or file, sorted by SeriesNumber then key, and
    what was left out; reads headers only (and pixel data of files that repeat another's SOPInstanceUID).
    Raises DicomInputError when `path` does not exist."""
    path = Path(path)
    found = _scan(path)
    notes = [line for lines in found.notes.values() for line in lines]
    if found.localizers:
        notes.append(f"{path}: {found.localizers} localizer image{'s' if found.localizers > 1 else ''} skipped")
    for (modality, what, key), count in sorted(found.skipped.items()):
        notes.append(f"{path}: skipped {modality} series {key} ({what}, {count} file{'s' if count > 1 else ''}): "
                     "not a CT image")
    if found.not_dicom:
        notes.append(f"{path}: {found.not_dicom} file{'s' if found.not_dicom > 1 else ''} skipped, not DICOM images")
    out = []
    for key, slices in found.series.items():
        first = slices[0].header
        out.append(SeriesInfo(key, str(first.get("StudyInstanceUID", "") or ""), _int(first.get("SeriesNumber")),
                              str(first.get("SeriesDescription", "") or ""), len(slices),
                              any(s.frame is not None for s in slices)))
    out.sort(key=lambda s: (s.series_number is None, s.series_number or 0, s.series_uid))
    return Survey(out, notes, _contents(found))


def _contents(found: _Survey) -> str:
    """What a source holds besides its CT series, e.g. '1 MR series (24 files), 3 other files'."""
    files: Counter[str] = Counter()
    series: Counter[str] = Counter()
    for (modality, _, _), count in found.skipped.items():
        files[modality] += count
        series[modality] += 1
    parts = [f"{series[m]} {m} series ({files[m]} file{'s' if files[m] > 1 else ''})" for m in sorted(series)]
    if found.localizers:
        parts.append(f"{found.localizers} localizer image{'s' if found.localizers > 1 else ''}")
    parts.append(f"{found.not_dicom} other file{'s' if found.not_dicom != 1 else ''}")
    return ", ".join(parts)


def find_ct_series(path: str | Path) -> list[SeriesInfo]:
    """The CT series of a folder (recursively) or .zip, sorted by SeriesNumber then UID; reads headers only.

    Logs (INFO) one line per thing left out (`Survey.notes`). Returns an empty list when there is no CT
    series. Raises DicomInputError when `path` does not exist.
    """
    found = survey(path)
    for line in found.notes:
        log.info("%s", line)
    return found.series


def list_ct_series(path: str | Path) -> dict[str, int]:
    """SeriesInstanceUID -> number of CT slices, for every CT series in a folder or .zip."""
    return {uid: len(slices) for uid, slices in _scan(Path(path)).series.items()}


def read_ct_series(path: str | Path, series_uid: str | None = None) -> list[DicomSeries]:
    """Read the CT series of a folder or .zip (all of them, or the one with `series_uid`).

    Files that are not DICOM, and objects that are not CT images (SEG, SR, MR, localizers...), are
    skipped; duplicates are dropped and images of another geometry set aside (`DicomSeries.notes`,
    logged at DEBUG: `find_ct_series` logs them). Raises DicomInputError (one line naming the input and
    the fix) when there is no CT series, the named series is absent, or a series cannot be made into a
    volume (no geometry held by most images, uneven or duplicated slice positions, undecodable pixel data).
    """
    path = Path(path)
    found = _scan(path)
    series = found.series
    if series_uid is not None:
        if series_uid not in series:
            known = ", ".join(f"{u} ({len(f)} slices)" for u, f in series.items()) or "none"
            kinds = sorted(f"{modality} ({what})" for modality, what, key in found.skipped if key == series_uid)
            why = f" (it is {', '.join(kinds)}, not a CT image series)" if kinds else ""
            raise DicomInputError(f"{path}: no CT series {series_uid}{why}; CT series there: {known}")
        series = {series_uid: series[series_uid]}
    if not series:
        raise DicomInputError(
            f"{path}: no CT image series found ({_contents(found)}); give a folder or .zip holding a CT series "
            "(CT Image Storage, one file per slice, or Enhanced / Legacy Converted Enhanced CT)")
    out = []
    for uid, slices in series.items():
        for line in found.notes.get(uid, []):
            log.debug("%s", line)
        out.append(_build(path, uid, slices, found.notes.get(uid, [])))
    return out


def read_ct_geometry(path: str | Path, series_uid: str) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape [X, Y, Z] and RAS affine [4, 4] of one CT series from its headers, without decoding pixels.

    The same checks as `read_ct_series` on the geometry (raises DicomInputError likewise).
    """
    path = Path(path)
    series = _scan(path).series
    if series_uid not in series:
        raise DicomInputError(f"{path}: no CT series {series_uid}; CT series there: "
                              f"{', '.join(series) or 'none'}")
    slices, affine = _geometry(f"{path}: series {series_uid}", series[series_uid])
    return (int(slices[0].columns or 0), int(slices[0].rows or 0), len(slices)), affine


def _build(path: Path, uid: str, slices: list[_Slice], notes: list[str]) -> DicomSeries:
    where = f"{path}: series {uid}"
    slices, affine = _geometry(where, slices)
    first = slices[0].header
    volume, padding = _pixels(where, slices)
    datasets = list({id(s.header): s.header for s in slices}.values())
    return DicomSeries(uid, str(first.get("StudyInstanceUID", "")), volume, affine, datasets, str(path),
                       str(first.get("SeriesDescription", "")), any(s.frame is not None for s in slices),
                       list(notes), padding)


def _geometry(where: str, slices: list[_Slice]) -> tuple[list[_Slice], np.ndarray]:
    """The slices in Z order and the series' RAS affine; raises DicomInputError for a geometry refused."""
    first = slices[0]
    for s in slices:
        for key, value in (("ImageOrientationPatient", s.orientation), ("ImagePositionPatient", s.position),
                           ("PixelSpacing", s.spacing), ("Rows", s.rows), ("Columns", s.columns)):
            if value is None:
                raise DicomInputError(f"{where}: {s.name} lacks {key}; the slice geometry cannot be known")
    geometries = Counter(
        (s.rows, s.columns, _plane(s.orientation), tuple(np.round(s.spacing, 3)))  # type: ignore[arg-type]
        for s in slices)
    if len(geometries) > 1 or any(
            not np.allclose(s.orientation, first.orientation, atol=ORIENTATION_TOLERANCE)  # type: ignore[arg-type]
            or not np.allclose(s.spacing, first.spacing, atol=PIXEL_SPACING_TOLERANCE)  # type: ignore[arg-type]
            for s in slices):
        described = "; ".join(f"{n} of {r}x{c} {plane} at {sp[0]:g} x {sp[1]:g} mm"
                              for (r, c, plane, sp), n in geometries.most_common())
        raise DicomInputError(f"{where}: images of several geometries and none held by most ({described}); "
                              "split the series")
    if len(slices) < 2:
        raise DicomInputError(f"{where}: has 1 slice; a CT volume needs at least 2")
    orientation = first.orientation
    assert orientation is not None and first.spacing is not None
    row_cos, col_cos = orientation[:3], orientation[3:]
    normal = np.cross(row_cos, col_cos)
    positions = np.array([s.position for s in slices])
    order = np.argsort(positions @ normal, kind="stable")
    slices = [slices[i] for i in order]
    positions = positions[order]
    along = positions @ normal
    gaps = np.diff(along)
    if gaps.min() < SAME_POSITION_MM:
        raise DicomInputError(f"{where}: {_shared_positions(slices, gaps)}; split the series, e.g. by "
                              "AcquisitionNumber or TemporalPositionIndex")
    step = (positions[-1] - positions[0]) / (len(slices) - 1)
    deviation = float(np.abs(positions - (positions[0] + np.arange(len(slices))[:, None] * step)).max())
    if deviation > SPACING_TOLERANCE * float(np.linalg.norm(step)):
        raise DicomInputError(
            f"{where}: uneven slice spacing ({gaps.min():.3f}-{gaps.max():.3f} mm along the slice normal, "
            f"a slice up to {deviation:.3f} mm off an even grid of {np.linalg.norm(step):.3f} mm); refused rather than "
            "resampled: resample it to even spacing or export the complete series")
    pixel_spacing = first.spacing  # [between rows, between columns]
    lps = np.eye(4)
    lps[:3, 0] = row_cos * pixel_spacing[1]
    lps[:3, 1] = col_cos * pixel_spacing[0]
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    affine = LPS_TO_RAS @ lps
    tilt = float(first.header.get("GantryDetectorTilt", 0) or 0)
    if abs(float(np.dot(step / np.linalg.norm(step), normal))) < 1 - 1e-6:
        log.info("%s: gantry tilt %.2f deg, sheared affine from the slice positions", where, tilt)
    return slices, affine


def _shared_positions(slices: list[_Slice], gaps: np.ndarray) -> str:
    """'48 files at 24 positions (2 at each ...)': images and distinct positions counted apart, and the
    header elements that tell apart the images at the first shared position."""
    positions = 1 + int(np.sum(gaps >= SAME_POSITION_MM))
    runs = np.split(np.arange(len(slices)), np.flatnonzero(gaps >= SAME_POSITION_MM) + 1)
    sizes = sorted({len(r) for r in runs if len(r) > 1})
    at = f"{sizes[0]} at each" if len(sizes) == 1 and all(len(r) == sizes[0] for r in runs) else \
        f"{' or '.join(map(str, sizes))} at {sum(len(r) > 1 for r in runs)} of them"
    unit = "files" if all(s.frame is None for s in slices) else "images"
    shared = [slices[i] for i in next(r for r in runs if len(r) > 1)]
    differ = [k for k in ("AcquisitionNumber", "TemporalPositionIndex", "EchoNumbers", "AcquisitionTime",
                          "ContentTime", "ImageType")
              if len({str(s.header.get(k, "")) for s in shared}) > 1 and all(s.frame is None for s in shared)]
    hint = f"; they differ in {', '.join(differ)}" if differ else ""
    return (f"{len(slices)} {unit} at {positions} positions ({at}: several acquisitions, phases or echoes in one "
            f"series{hint})")


def _dataset(f: _File) -> Dataset:
    """The whole file (pixel data too), also without a Part-10 header; DicomInputError naming it if unreadable."""
    try:
        with f.opener() as fo:
            ds = pydicom.dcmread(fo, force=True)  # known DICOM: also without a Part-10 header
    except Exception as exc:  # noqa: BLE001 - re-raised as one line naming the file
        raise DicomInputError(f"{f.name}: cannot read it again: {' '.join(str(exc).split())[:300]}; was it changed "
                              "or removed while being read?") from exc
    if "TransferSyntaxUID" not in ds.file_meta:  # no Part-10 header: uncompressed, as it was parsed
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    return ds


def _frames(f: _File, wanted: set[int | None]) -> Iterator[tuple[int | None, np.ndarray]]:
    """(frame, stored values [rows, columns]) of the `wanted` frames of file `f` (None: its single frame), in
    the file's order, one frame decoded at a time."""
    syntax = f.header.file_meta.get("TransferSyntaxUID") if "file_meta" in dir(f.header) else None
    ds = _dataset(f)
    try:
        if wanted == {None}:
            yield None, ds.pixel_array
            return
        for index, array in enumerate(pydicom.pixels.iter_pixels(ds)):
            if index in wanted:
                yield index, array
    except Exception as exc:  # noqa: BLE001 - re-raised as one line naming the file
        name = getattr(syntax, "name", syntax)
        raise DicomInputError(
            f"{f.name}: cannot decode its pixel data ({name}): {' '.join(str(exc).split())[:300]}; a corrupt file, "
            "or install the decoder pydicom names (pylibjpeg-openjpeg, pylibjpeg-libjpeg, pylibjpeg-rle, "
            "python-gdcm)") from exc


def _padding(header: Dataset, slope: float, intercept: float) -> tuple[float, float] | None:
    """The HU range of the header's PixelPaddingValue (to PixelPaddingRangeLimit), None without the tag."""
    value = _int(header.get("PixelPaddingValue"))
    if value is None:
        return None
    limit = _int(header.get("PixelPaddingRangeLimit"))
    ends = [value * slope + intercept, (value if limit is None else limit) * slope + intercept]
    return min(ends), max(ends)


def _pixels(where: str, slices: list[_Slice]) -> tuple[np.ndarray, list[tuple[float, float] | None]]:
    """The volume [X, Y, Z] in HU (int16 when exact, else float32) and each slice's padding HU range."""
    first = slices[0]
    if int(first.header.get("SamplesPerPixel", 1)) != 1:
        raise DicomInputError(f"{where}: {first.header.get('PhotometricInterpretation')} colour images are not CT; "
                              "give the CT series")
    # int16 while every value so far is an exact integer within int16, float32 from the first that is not;
    # one slice at a time in float64 (a 512x512x400 volume in float64 would be 0.8 GB)
    volume = np.empty((int(first.columns or 0), int(first.rows or 0), len(slices)), dtype=np.int16)
    padding: list[tuple[float, float] | None] = []
    info = np.iinfo(np.int16)
    by_file: dict[int, list[int]] = {}  # id(file) -> z of its slices, in Z order
    for z, s in enumerate(slices):
        by_file.setdefault(id(s.file), []).append(z)
    for zs in by_file.values():
        z_of = {slices[z].frame: z for z in zs}
        decoded = 0
        for frame, stored in _frames(slices[zs[0]].file, set(z_of)):
            decoded += 1
            z = z_of[frame]
            s = slices[z]
            slope, intercept = s.slope, s.intercept
            if stored.shape != (s.rows, s.columns):
                raise DicomInputError(f"{s.name}: pixel data of {stored.shape} where its header says {s.rows}x"
                                      f"{s.columns}; a corrupt file")
            hu = stored.T * slope + intercept
            if volume.dtype == np.int16 and not (
                    np.all(hu == np.round(hu)) and hu.min() >= info.min and hu.max() <= info.max):
                volume = volume.astype(np.float32)
            volume[:, :, z] = hu
        if decoded < len(zs):
            raise DicomInputError(f"{slices[zs[0]].file.name}: its pixel data end after {decoded} of the "
                                  f"{len(zs)} frames its header describes; a truncated file: export it again")
    for s in slices:
        padding.append(_padding(s.header, s.slope, s.intercept))
    return volume, padding


def ct_series_headers(
    shape: tuple[int, int, int],
    affine: np.ndarray,
    *,
    slope: float = 1.0,
    intercept: float = -1024.0,
    study_uid: str | None = None,
    series_uid: str | None = None,
    patient_id: str = "ANON",
    series_description: str = "",
    gantry_tilt_deg: float | None = None,
) -> list[Dataset]:
    """The headers (no pixel data) of a CT series (CT Image Storage, LPS) of a volume [X, Y, Z] = `shape`.

    affine: [4, 4] voxel -> RAS mm whose first two columns are orthogonal (the third may be sheared:
    gantry tilt). Slice z is at affine @ (0, 0, z, 1). Pixel module: int16 stored values (16 bits,
    signed), HU = slope * stored + intercept. Raises ValueError for non-orthogonal in-plane axes.
    """
    lps = np.linalg.inv(LPS_TO_RAS) @ np.asarray(affine, float)
    col_step, row_step, slice_step = lps[:3, 0], lps[:3, 1], lps[:3, 2]
    dx, dy = np.linalg.norm(col_step), np.linalg.norm(row_step)
    if abs(np.dot(col_step, row_step)) > 1e-6 * dx * dy:
        raise ValueError("the affine's first two columns are not orthogonal: no DICOM slice has that geometry")
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    nx, ny, nz = shape
    out = []
    for z in range(nz):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = "CT"
        ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = patient_id, f"{patient_id}^", "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.StudyID, ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", "", "", ""
        ds.SeriesNumber, ds.InstanceNumber = 1, z + 1
        ds.SeriesDescription = series_description
        ds.Manufacturer = "wholebody-ct-triton"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [_ds(v) for v in (*(col_step / dx), *(row_step / dy))]
        ds.ImagePositionPatient = [_ds(v) for v in lps[:3, 3] + z * slice_step]
        ds.PixelSpacing = [_ds(dy), _ds(dx)]
        ds.SliceThickness = _ds(abs(float(np.dot(slice_step, np.cross(col_step / dx, row_step / dy)))))
        if gantry_tilt_deg is not None:
            ds.GantryDetectorTilt = _ds(gantry_tilt_deg)
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = _ds(slope), _ds(intercept), "HU"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = ny, nx
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        out.append(ds)
    return out


def write_ct_series(
    volume: np.ndarray,
    affine: np.ndarray,
    folder: str | Path,
    *,
    slope: float = 1.0,
    intercept: float = -1024.0,
    transfer_syntax: str = ExplicitVRLittleEndian,
    **header: object,
) -> list[Path]:
    """Write a volume as a CT series (CT Image Storage, one file per slice, LPS) into `folder`.

    volume: [X, Y, Z] HU (any numeric dtype); affine: [4, 4] voxel -> RAS mm (see `ct_series_headers`,
    which takes the other keywords: study_uid, series_uid, patient_id, series_description,
    gantry_tilt_deg). Stored values are round((HU - intercept) / slope) as int16. transfer_syntax: any
    one pydicom can encode (Explicit VR Little Endian, RLE Lossless, JPEG 2000 Lossless, JPEG-LS
    Lossless). Returns the files, named by slice index. Raises ValueError for a non-3-D volume,
    non-orthogonal in-plane axes or stored values outside int16.
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"volume must be 3-D [X, Y, Z], got shape {volume.shape}")
    stored = np.round((volume.astype(np.float64) - intercept) / slope)
    if stored.min() < -32768 or stored.max() > 32767:
        raise ValueError(f"stored values {stored.min():.0f}..{stored.max():.0f} exceed int16; change slope/intercept")
    stored = stored.astype(np.int16)
    headers = ct_series_headers(volume.shape, affine, slope=slope, intercept=intercept, **header)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    width = len(str(len(headers)))
    paths = []
    for z, ds in enumerate(headers):
        pixels = np.ascontiguousarray(stored[:, :, z].T)
        ds.PixelData = pixels.tobytes()
        if transfer_syntax != ExplicitVRLittleEndian:
            ds.compress(transfer_syntax, pixels)
        path = folder / f"slice_{z:0{width}d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _ds(value: float) -> str:
    """A decimal string of at most 16 characters (DICOM DS) holding `value` as precisely as fits."""
    for digits in range(16, 0, -1):
        text = f"{value:.{digits}g}"
        if len(text) <= 16:
            return text
    raise ValueError(value)

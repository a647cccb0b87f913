"""DICOM CT series in: a folder or a .zip of files -> volume [X, Y, Z] in HU and its RAS affine.

The volume has nibabel's voxel order for a DICOM series: X = column index within a slice, Y = row
index, Z = slice index in ascending position along the slice normal (row cosine x column cosine).
The affine maps (X, Y, Z, 1) to RAS mm:

    LPS = ImagePositionPatient[first] + X * PixelSpacing[1] * row cosine
                                      + Y * PixelSpacing[0] * column cosine
                                      + Z * (position[last] - position[first]) / (slices - 1)
    RAS = diag(-1, -1, 1) @ LPS

A gantry-tilted series keeps its slices' own positions, so its affine is sheared (the third column
is not along the slice normal): that is the exact geometry of the voxels, not an approximation, and
no resampling happens here. A series whose slice positions are not evenly spaced (a missing slice,
mixed spacings, several acquisitions at one position) is refused with one line naming the series
and the spread; resample or split it with the scanner's or PACS's tools first.

Pixel data are decoded by pydicom and its plugins (pylibjpeg-openjpeg: JPEG 2000, pylibjpeg-libjpeg:
JPEG lossless/baseline, pylibjpeg-rle or pydicom's own: RLE; python-gdcm where installed). Values are
RescaleSlope * stored + RescaleIntercept per slice: int16 when every value is an integer within int16
(no information lost), float32 otherwise.

`write_ct_series` does the reverse (CT Image Storage, one file per slice) for tests, demos and
PACS uploads of NIfTI volumes.
"""

from __future__ import annotations

import io
import logging
import struct
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (CTImageStorage, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                         generate_uid)

log = logging.getLogger(__name__)

ENHANCED_CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
DICOMDIR_STORAGE = "1.2.840.10008.1.3.10"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# slice positions may deviate this much (fraction of the slice spacing) from an even grid: DICOM
# decimal strings and scanners round positions (e.g. to 0.01 mm); a missing slice deviates by 1.0
SPACING_TOLERANCE = 0.1
ORIENTATION_TOLERANCE = 1e-4  # of the direction cosines, between the slices of one series


class DicomInputError(ValueError):
    """A DICOM input that cannot be made into a CT volume; the message is one line naming the input and the fix."""


@dataclass
class DicomSeries:
    """One CT series read into memory.

    volume: [X, Y, Z] int16 (exact) or float32, HU. affine: [4, 4] float64, voxel -> RAS mm.
    datasets: the slices' headers (no pixel data) in Z order, the source images for a DICOM-SEG.
    """

    series_uid: str
    study_uid: str
    volume: np.ndarray
    affine: np.ndarray
    datasets: list[Dataset] = field(repr=False)
    source: str = ""
    description: str = ""

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
    opener: object  # callable returning a binary file object


def _iter_files(path: Path) -> Iterator[tuple[str, object]]:
    """(display name, opener) for every file of a folder (recursively) or a .zip."""
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            yield str(f), (lambda f=f: open(f, "rb"))
    elif zipfile.is_zipfile(path):
        def member(name: str) -> io.BytesIO:  # the archive is opened per read: no handle outlives a call
            with zipfile.ZipFile(path) as archive:
                return io.BytesIO(archive.read(name))

        with zipfile.ZipFile(path) as archive:
            names = [info.filename for info in archive.infolist() if not info.is_dir()]
        for name in names:
            yield f"{path}:{name}", (lambda n=name: member(n))
    elif path.is_file():
        yield str(path), (lambda: open(path, "rb"))
    else:
        raise DicomInputError(f"{path}: no such file or folder; give a folder or a .zip of DICOM files")


def _read_header(opener: object) -> Dataset | None:
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
            if "Modality" in header and "ImagePositionPatient" in header and "SeriesInstanceUID" in header:
                return header
        except Exception:  # noqa: BLE001 - garbage parsed as elements fails on access
            return None
    return None


def _scan(path: Path) -> tuple[dict[str, list[_File]], dict[str, str], int, int]:
    """Headers of every DICOM file, grouped by SeriesInstanceUID; other series' kinds; files skipped;
    localizer images skipped."""
    series: dict[str, list[_File]] = {}
    others: dict[str, str] = {}
    skipped = localizers = 0
    for name, opener in _iter_files(path):
        header = _read_header(opener)
        if header is None:
            log.debug("skipping %s: not DICOM", name)
            skipped += 1
            continue
        sop_class = str(header.get("SOPClassUID", "") or "")
        if not sop_class and "file_meta" in dir(header):  # anonymisers drop it; the file meta keeps it
            sop_class = str(header.file_meta.get("MediaStorageSOPClassUID", ""))
            if sop_class:
                header.SOPClassUID = sop_class
        if sop_class == DICOMDIR_STORAGE:
            skipped += 1
            continue
        if not header.get("SOPInstanceUID") and "file_meta" in dir(header):
            header.SOPInstanceUID = header.file_meta.get("MediaStorageSOPInstanceUID", "")
        uid = str(header.get("SeriesInstanceUID", "") or "")
        if not uid:  # badly anonymised: one series per folder, named so in messages
            uid = f"(no SeriesInstanceUID, folder {Path(name.split(':')[-1]).parent})"
        if sop_class != str(CTImageStorage) or header.get("Modality") != "CT":
            kind = "enhanced (multi-frame) CT" if sop_class == ENHANCED_CT_STORAGE else str(header.get("Modality"))
            others[uid] = kind
            continue
        if "LOCALIZER" in [str(v).upper() for v in header.get("ImageType", [])]:
            log.debug("%s: skipping a localizer image", name)  # find_ct_series reports them once per source
            localizers += 1
            continue
        series.setdefault(uid, []).append(_File(name, header, opener))
    return series, others, skipped, localizers


def list_ct_series(path: str | Path) -> dict[str, int]:
    """SeriesInstanceUID -> number of CT slices, for every CT series in a folder or .zip."""
    series, _, _, _ = _scan(Path(path))
    return {uid: len(files) for uid, files in series.items()}


def read_ct_series(path: str | Path, series_uid: str | None = None) -> list[DicomSeries]:
    """Read the CT series of a folder or .zip (all of them, or the one with `series_uid`).

    Files that are not DICOM, and series that are not CT Image Storage (SEG, SR, MR, localizers...),
    are skipped. Raises DicomInputError (one line naming the input and the fix) when there is no CT
    series, the named series is absent, or a series cannot be made into a volume (mixed geometry,
    uneven or duplicated slice positions, undecodable pixel data).
    """
    path = Path(path)
    series, others, skipped, _ = _scan(path)
    if series_uid is not None:
        if series_uid not in series:
            known = ", ".join(f"{u} ({len(f)} slices)" for u, f in series.items()) or "none"
            why = f" (it is {others[series_uid]}, not single-frame CT)" if series_uid in others else ""
            raise DicomInputError(f"{path}: no CT series {series_uid}{why}; CT series there: {known}")
        series = {series_uid: series[series_uid]}
    if not series:
        kinds = ", ".join(sorted(set(others.values())))
        what = f"{len(others)} non-CT series ({kinds})" if others else "no DICOM series"
        raise DicomInputError(
            f"{path}: no CT image series found ({what}, {skipped} other files); give a folder or .zip holding "
            "a CT series (CT Image Storage, one file per slice)")
    return [_build(path, uid, files) for uid, files in series.items()]


@dataclass(frozen=True)
class SeriesInfo:
    """What a folder or .zip says of one of its CT series, from the headers alone (no pixel data)."""

    series_uid: str
    study_uid: str
    series_number: int | None  # SeriesNumber, None when absent
    description: str  # SeriesDescription
    slices: int


def find_ct_series(path: str | Path) -> list[SeriesInfo]:
    """The CT series of a folder (recursively) or .zip, sorted by SeriesNumber then UID; reads headers only.

    Returns an empty list when there is none (other files and non-CT series are skipped as in
    `read_ct_series`). Raises DicomInputError when `path` does not exist.
    """
    series, _, _, localizers = _scan(Path(path))
    if localizers:
        log.info("%s: %d localizer image%s skipped", path, localizers, "s" if localizers > 1 else "")
    out = []
    for uid, files in series.items():
        first = files[0].header
        number = first.get("SeriesNumber")
        try:
            number = int(number) if number not in (None, "") else None
        except (TypeError, ValueError):
            number = None
        out.append(SeriesInfo(uid, str(first.get("StudyInstanceUID", "") or ""), number,
                              str(first.get("SeriesDescription", "") or ""), len(files)))
    return sorted(out, key=lambda s: (s.series_number is None, s.series_number or 0, s.series_uid))


def read_ct_geometry(path: str | Path, series_uid: str) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape [X, Y, Z] and RAS affine [4, 4] of one CT series from its headers, without decoding pixels.

    The same checks as `read_ct_series` on the geometry (raises DicomInputError likewise).
    """
    path = Path(path)
    series, _, _, _ = _scan(path)
    if series_uid not in series:
        raise DicomInputError(f"{path}: no CT series {series_uid}; CT series there: "
                              f"{', '.join(series) or 'none'}")
    files, affine = _geometry(f"{path}: series {series_uid}", series[series_uid])
    first = files[0].header
    return (int(first.Columns), int(first.Rows), len(files)), affine


def _build(path: Path, uid: str, files: list[_File]) -> DicomSeries:
    where = f"{path}: series {uid}"
    files, affine = _geometry(where, files)
    first = files[0].header
    volume = _pixels(where, files)
    datasets = [f.header for f in files]
    return DicomSeries(uid, str(first.get("StudyInstanceUID", "")), volume, affine, datasets, str(path),
                       str(first.get("SeriesDescription", "")))


def _geometry(where: str, files: list[_File]) -> tuple[list[_File], np.ndarray]:
    """The slices in Z order and the series' RAS affine; raises DicomInputError for a geometry refused."""
    first = files[0].header
    for f in files:
        h = f.header
        for key in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "Rows", "Columns"):
            if key not in h:
                raise DicomInputError(f"{where}: {f.name} lacks {key}; the slice geometry cannot be known")
        if (h.Rows, h.Columns) != (first.Rows, first.Columns):
            raise DicomInputError(f"{where}: slices of {first.Rows}x{first.Columns} and {h.Rows}x{h.Columns} "
                                  "pixels; split the series")
        if not np.allclose(np.asarray(h.PixelSpacing, float), np.asarray(first.PixelSpacing, float), atol=1e-4):
            raise DicomInputError(f"{where}: pixel spacing differs between slices; split the series")
        if not np.allclose(np.asarray(h.ImageOrientationPatient, float),
                           np.asarray(first.ImageOrientationPatient, float), atol=ORIENTATION_TOLERANCE):
            raise DicomInputError(f"{where}: slice orientation differs between slices; split the series")
    if len(files) < 2:
        raise DicomInputError(f"{where}: has 1 slice; a CT volume needs at least 2")
    orientation = np.asarray(first.ImageOrientationPatient, float)
    row_cos, col_cos = orientation[:3], orientation[3:]
    normal = np.cross(row_cos, col_cos)
    positions = np.array([np.asarray(f.header.ImagePositionPatient, float) for f in files])
    order = np.argsort(positions @ normal, kind="stable")
    files = [files[i] for i in order]
    positions = positions[order]
    along = positions @ normal
    gaps = np.diff(along)
    if gaps.min() < 1e-3:
        raise DicomInputError(
            f"{where}: {int(np.sum(gaps < 1e-3)) + 1} slices share a position (several acquisitions, phases or "
            "echoes in one series); split the series, e.g. by AcquisitionNumber or TemporalPositionIndex")
    step = (positions[-1] - positions[0]) / (len(files) - 1)
    deviation = float(np.abs(positions - (positions[0] + np.arange(len(files))[:, None] * step)).max())
    if deviation > SPACING_TOLERANCE * float(np.linalg.norm(step)):
        raise DicomInputError(
            f"{where}: uneven slice spacing ({gaps.min():.3f}-{gaps.max():.3f} mm along the slice normal, "
            f"a slice up to {deviation:.3f} mm off an even grid of {np.linalg.norm(step):.3f} mm); refused rather than "
            "resampled: resample it to even spacing or export the complete series")
    pixel_spacing = np.asarray(first.PixelSpacing, float)  # [between rows, between columns]
    lps = np.eye(4)
    lps[:3, 0] = row_cos * pixel_spacing[1]
    lps[:3, 1] = col_cos * pixel_spacing[0]
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    affine = LPS_TO_RAS @ lps
    tilt = float(first.get("GantryDetectorTilt", 0) or 0)
    if abs(float(np.dot(step / np.linalg.norm(step), normal))) < 1 - 1e-6:
        log.info("%s: gantry tilt %.2f deg, sheared affine from the slice positions", where, tilt)
    return files, affine


def _pixels(where: str, files: list[_File]) -> np.ndarray:
    first = files[0].header
    if int(first.get("SamplesPerPixel", 1)) != 1:
        raise DicomInputError(f"{where}: {first.get('PhotometricInterpretation')} colour images are not CT; "
                              "give the CT series")
    # int16 while every value so far is an exact integer within int16, float32 from the first that is not;
    # one slice at a time in float64 (a 512x512x400 volume in float64 would be 0.8 GB)
    volume = np.empty((int(first.Columns), int(first.Rows), len(files)), dtype=np.int16)
    info = np.iinfo(np.int16)
    for z, f in enumerate(files):
        syntax = f.header.file_meta.get("TransferSyntaxUID") if "file_meta" in dir(f.header) else None
        try:
            with f.opener() as fo:
                ds = pydicom.dcmread(fo, force=True)  # known DICOM: also without a Part-10 header
            if "TransferSyntaxUID" not in ds.file_meta:  # no Part-10 header: uncompressed, as it was parsed
                implicit, little = ds.original_encoding
                ds.file_meta.TransferSyntaxUID = (
                    ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
            stored = ds.pixel_array
        except Exception as exc:  # noqa: BLE001 - re-raised as one line naming the file
            name = getattr(syntax, "name", syntax)
            raise DicomInputError(
                f"{f.name}: cannot decode its pixel data ({name}): {' '.join(str(exc).split())[:300]}; a corrupt file, "
                "or install the decoder pydicom names (pylibjpeg-openjpeg, pylibjpeg-libjpeg, pylibjpeg-rle, "
                "python-gdcm)") from exc
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        hu = stored.T * slope + intercept
        if volume.dtype == np.int16 and not (
                np.all(hu == np.round(hu)) and hu.min() >= info.min and hu.max() <= info.max):
            volume = volume.astype(np.float32)
        volume[:, :, z] = hu
    return volume


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

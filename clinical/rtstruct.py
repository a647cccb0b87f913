"""RTSTRUCT out: a label map on a CT series' grid -> one RT Structure Set Storage instance, for radiotherapy.

One ROI per structure present, named with the bundle's structure names and shown in its colours (both from
`clinical/structures.json` through `clinical.structures`), marked AUTOMATIC and UNAPPROVED (a planner reviews
automatic contours before use). Each ROI is a set of CLOSED_PLANAR contours, one or more per CT slice it
touches, each referencing that slice's SOP Instance; holes come as further contours on the same slice (the
even-odd rule of radiotherapy planning systems fills them as holes).

Contours: scikit-image's `measure.find_contours` (marching squares at the 0.5 level of the binary slice, so
the outline runs half-way between a structure's pixel centres and its neighbours'), keeping only the points
where an outline turns (a straight run is the same line without its middle points; Douglas-Peucker thinning,
`measure.approximate_polygon`, took longer than everything else together and kept as many points). Each
structure is cropped to its bounding box first (`scipy.ndimage.find_objects`). Points go from (row, column)
of a slice to patient LPS mm with that slice's own ImagePositionPatient, ImageOrientationPatient and
PixelSpacing, so non-square pixels, uneven slice spacing and gantry tilt are placed right.

Why not rt-utils (the usual choice): 1.2.7 works with pydicom 3, but it requires the GUI build of OpenCV
(`opencv-python`, not the headless wheel) and the `dataclasses` backport, its output fails dciodvfy (no Frame
of Reference UID, no Type 2 ReferringPhysicianName / AccessionNumber / OperatorsName /
PositionReferenceIndicator), and it maps a whole series with one matrix from the first slice and the mean
spacing, scaling columns by the row spacing (square pixels and untilted series only). docs/quality-and-reports.md.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, RTStructureSetStorage
from scipy import ndimage
from skimage import measure

from clinical import structures as st
from clinical.dicom_seg import ALGORITHM_NAME, BUNDLE_VERSION, MANUFACTURER, coded_concept, series_and_instance_uids
from wholebody.atomic import atomic_write

log = logging.getLogger(__name__)

# How a contour is made, recorded in the client's resume recipe (a rerun by a version that contours otherwise
# makes its RTSTRUCTs again): marching squares at 0.5, straight runs reduced to their ends
CONTOURS = "find_contours-0.5-corners"
# The RT Referenced Study's Referenced SOP Class UID: the (retired) Detached Study Management SOP Class, what
# RTSTRUCT writers put there (rt-utils does) and dciodvfy accepts
DETACHED_STUDY_MANAGEMENT = "1.2.840.10008.3.1.2.3.1"
REFERENCED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "FrameOfReferenceUID")
GEOMETRY = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
CONTOUR_DATA = Tag(0x3006, 0x0050)


class RtStructError(ValueError):
    """An RTSTRUCT that cannot be written; the message is one line naming the file and the fix."""


def slice_contours(mask: np.ndarray) -> list[np.ndarray]:
    """The outlines of a binary slice: a list of [N, 2] float arrays of (row, column) pixel coordinates.

    mask: [rows, columns] bool. Each outline is closed (its last point is not its first repeated), has at
    least 3 points and runs at the 0.5 level between foreground and background pixel centres; pixels on the
    slice's edge are closed off by a one-pixel background border. Holes are outlines of their own. Points in
    the middle of a straight run are left out (`_corners`): the outline is the same without them.
    """
    padded = np.pad(mask.astype(np.float32), 1)
    out = []
    for contour in measure.find_contours(padded, 0.5, fully_connected="high"):
        if len(contour) > 1 and np.array_equal(contour[0], contour[-1]):
            contour = contour[:-1]
        contour = _corners(contour) - 1.0  # undo the border
        if len(contour) >= 3:
            out.append(contour)
    return out


def _corners(contour: np.ndarray) -> np.ndarray:
    """The points of a closed outline [N, 2] where it turns (cross product of the steps in and out not 0)."""
    before = contour - np.roll(contour, 1, axis=0)
    after = np.roll(contour, -1, axis=0) - contour
    turn = before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]
    return contour[np.abs(turn) > 1e-9]


def pixel_to_patient(ds: Dataset, points: np.ndarray) -> np.ndarray:
    """(row, column) pixel coordinates [N, 2] of the slice `ds` -> patient LPS mm [N, 3] (float64).

    DICOM PS3.3 C.7.6.2.1.1: P = IPP + column * PixelSpacing[1] * IOP[0:3] + row * PixelSpacing[0] * IOP[3:6]
    (PixelSpacing is row spacing, then column spacing).
    """
    position = np.asarray(ds.ImagePositionPatient, dtype=np.float64)
    orientation = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
    row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
    rows, columns = points[:, 0:1], points[:, 1:2]
    return position + columns * column_spacing * orientation[:3] + rows * row_spacing * orientation[3:]


def _copy(target: Dataset, source: Dataset, keys: Sequence[str]) -> None:
    """Copy `keys` from `source`, empty where absent (Type 2 attributes must be present, may be empty)."""
    for key in keys:
        setattr(target, key, source.get(key, ""))


def write_rtstruct(
    label_map: np.ndarray,
    source: Sequence[Dataset],
    path: str | Path,
    names: Sequence[str] | None = None,
    colors: Sequence[tuple[int, int, int]] | None = None,
    *,
    series_number: int = 302,
    series_description: str = "wholeBody_ct_segmentation RTSTRUCT",
    uid_seed: str | None = None,
) -> Path:
    """Write `label_map` as an RT Structure Set referencing the CT slices `source` (their headers, in Z order).

    label_map: [X, Y, Z] uint8 bundle labels on the source series' grid, as `clinical.dicom_series.read_ct_series`
    gives it (X = column, Y = row, Z = slice in `source` order). names / colors: per label value, the ROI name
    and display colour (r, g, b 0..255); default the bundle's (`clinical.structures`). The file is written under
    a temporary name and renamed when complete (`wholebody.atomic`). Returns `path`.
    uid_seed: None gives fresh Series and SOP Instance UIDs; a string derives both from it, so writing the
    RTSTRUCT of one source again gives the same UIDs.
    Raises RtStructError (one line naming `path`) for a label map of another shape or an empty one, a label
    without a name or colour, a multi-frame source, or source headers lacking the UIDs or geometry an RTSTRUCT
    must reference.
    """
    path = Path(path)
    names = list(st.label_names() if names is None else names)
    colors = [tuple(c) for c in ([s.color for s in st.structures()] if colors is None else colors)]
    if not source:
        raise RtStructError(f"{path}: no source CT slices given; an RTSTRUCT references its CT series")
    first = source[0]
    expected = (int(first.Columns), int(first.Rows), len(source))
    if label_map.ndim != 3 or label_map.shape != expected:
        raise RtStructError(f"{path}: label map {label_map.shape} is not on the source series' grid {expected} "
                            "(columns, rows, slices); segment the series' own volume")
    if any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for ds in source):
        raise RtStructError(f"{path}: the source is a multi-frame (enhanced) CT, which this version does not "
                            "contour; write a DICOM-SEG or NIfTI instead")
    for key in REFERENCED + GEOMETRY:
        if not all(ds.get(key) for ds in source):
            raise RtStructError(f"{path}: the source series lacks {key} (anonymised away?), so an RTSTRUCT cannot "
                                "reference it; write NIfTI or seg.nrrd instead")
    label_map = np.asarray(label_map)
    if label_map.dtype != np.uint8 and label_map.size and (label_map.min() < 0 or label_map.max() > 255):
        # a cast to uint8 wraps them (300 -> 44): an ROI under another structure's name
        raise RtStructError(f"{path}: label values {label_map.min()}..{label_map.max()} outside 0..255; give the "
                            "bundle's uint8 labels")
    label_map = label_map.astype(np.uint8, copy=False)
    boxes = ndimage.find_objects(label_map)  # label - 1 -> its bounding box, None when absent
    present = [i + 1 for i, box in enumerate(boxes) if box is not None]
    if not present:
        raise RtStructError(f"{path}: the label map is empty (no structure found); an RTSTRUCT needs one ROI")
    if present[-1] >= min(len(names), len(colors)):
        known = min(len(names), len(colors))
        raise RtStructError(f"{path}: label {present[-1]} has no name or colour (0..{known - 1}); give names and colors")

    series_uid, sop_uid = series_and_instance_uids(uid_seed, "rtstruct")
    frame_uid = str(first.FrameOfReferenceUID)
    now = datetime.datetime.now()

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if first.get("SpecificCharacterSet"):
        ds.SpecificCharacterSet = first.SpecificCharacterSet
    ds.SOPClassUID, ds.SOPInstanceUID = RTStructureSetStorage, sop_uid
    ds.InstanceCreationDate, ds.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    # Patient and General Study: the CT's
    _copy(ds, first, ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"))
    ds.StudyInstanceUID = first.StudyInstanceUID
    _copy(ds, first, ("StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber"))
    # RT Series, General Equipment, Frame of Reference
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "RTSTRUCT", series_uid, series_number
    ds.SeriesDescription, ds.OperatorsName = series_description, ""
    ds.Manufacturer, ds.ManufacturerModelName = MANUFACTURER, ALGORITHM_NAME
    ds.SoftwareVersions, ds.DeviceSerialNumber = BUNDLE_VERSION, "0"
    ds.FrameOfReferenceUID = frame_uid
    _copy(ds, first, ("PositionReferenceIndicator",))
    # Structure Set: the CT series' slices, then one ROI per structure
    ds.StructureSetLabel = "wholebody"[:16]
    ds.StructureSetName = ALGORITHM_NAME[:64]
    ds.StructureSetDate, ds.StructureSetTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    ds.InstanceNumber = 1
    images = []
    for slice_ds in source:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = slice_ds.SOPClassUID, slice_ds.SOPInstanceUID
        images.append(item)
    series_ref = Dataset()
    series_ref.SeriesInstanceUID, series_ref.ContourImageSequence = first.SeriesInstanceUID, images
    study_ref = Dataset()
    study_ref.ReferencedSOPClassUID = DETACHED_STUDY_MANAGEMENT
    study_ref.ReferencedSOPInstanceUID = first.StudyInstanceUID
    study_ref.RTReferencedSeriesSequence = [series_ref]
    frame_ref = Dataset()
    frame_ref.FrameOfReferenceUID, frame_ref.RTReferencedStudySequence = frame_uid, [study_ref]
    ds.ReferencedFrameOfReferenceSequence = [frame_ref]

    bundle = st.structures()
    rois, contours, observations = [], [], []
    for number, label in enumerate(present, start=1):
        roi = Dataset()
        roi.ROINumber, roi.ReferencedFrameOfReferenceUID, roi.ROIName = number, frame_uid, names[label]
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        roi.ROIGenerationDescription = f"{ALGORITHM_NAME} {BUNDLE_VERSION}"[:64]
        rois.append(roi)
        roi_contour = Dataset()
        roi_contour.ROIDisplayColor = [int(c) for c in colors[label]]
        roi_contour.ReferencedROINumber = number
        roi_contour.ContourSequence = _contours(label_map, label, boxes[label - 1], source)
        contours.append(roi_contour)
        observation = Dataset()
        observation.ObservationNumber, observation.ReferencedROINumber = number, number
        observation.RTROIInterpretedType, observation.ROIInterpreter = "ORGAN", ""
        _identify(observation, bundle[label] if label < len(bundle) and bundle[label].name == names[label] else None)
        observations.append(observation)
    ds.StructureSetROISequence, ds.ROIContourSequence = rois, contours
    ds.RTROIObservationsSequence = observations
    ds.ApprovalStatus = "UNAPPROVED"

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda stream: ds.save_as(stream, enforce_file_format=True))
    log.debug("%s: %d ROIs, %d contours", path, len(rois), sum(len(c.ContourSequence) for c in contours))
    return path


def _identify(observation: Dataset, structure: st.Structure | None) -> None:
    """Code the ROI as the SEG codes its segment (PS3.3 C.8.8.8 RT ROI Observations Module, Type 3): the
    Segmented Property Category Code Sequence, and the RT ROI Identification Code Sequence (one item) holding the
    structure's SNOMED CT type with its laterality as a Segmented Property Type Modifier Code Sequence. Codes from
    `clinical/structures.json` (TotalSegmentator's SNOMED mapping); nothing for a renamed or uncoded ROI, so a
    name never carries another structure's code."""
    if structure is None or structure.type is None or structure.category is None:
        return
    identification = coded_concept(structure.type)
    if structure.modifier is not None:
        identification.SegmentedPropertyTypeModifierCodeSequence = [coded_concept(structure.modifier)]
    observation.RTROIIdentificationCodeSequence = [identification]
    observation.SegmentedPropertyCategoryCodeSequence = [coded_concept(structure.category)]


def _contours(label_map: np.ndarray, label: int, box: tuple[slice, slice, slice],
              source: Sequence[Dataset]) -> list[Dataset]:
    """The CLOSED_PLANAR contour items of `label` within its bounding `box`, slice by slice (Z order), each
    referencing its slice."""
    items: list[Dataset] = []
    crop = label_map[box] == label
    corner = np.array([box[1].start, box[0].start], dtype=np.float64)  # (row, column) of the crop's origin
    for dz in np.flatnonzero(np.any(crop, axis=(0, 1))):
        z = box[2].start + int(dz)
        for outline in slice_contours(crop[:, :, dz].T):  # [X, Y] -> [rows, columns]
            points = pixel_to_patient(source[z], outline + corner)
            image = Dataset()
            image.ReferencedSOPClassUID = source[z].SOPClassUID
            image.ReferencedSOPInstanceUID = source[z].SOPInstanceUID
            item = Dataset()
            item.ContourImageSequence = [image]
            item.ContourGeometricType = "CLOSED_PLANAR"
            item.NumberOfContourPoints = len(points)
            item.ContourNumber = len(items) + 1
            item[CONTOUR_DATA] = _decimal_strings(CONTOUR_DATA, points.ravel())
            items.append(item)
    return items


def _decimal_strings(tag: Tag, values: np.ndarray) -> RawDataElement:
    """`values` as one DS element, encoded as Explicit VR Little Endian (the transfer syntax written here).

    Micrometres ("%.3f", at most 16 characters per value for |value| < 1e11 mm) are finer than any CT grid.
    Given pydicom as encoded bytes: made value by value, its DS objects cost more than the contours themselves
    (5 of 8 s for 94,000 points; `python -m perf.rtstruct_benchmark`)."""
    text = "\\".join(f"{v:.3f}" for v in values).encode("ascii")
    if len(text) % 2:
        text += b" "  # DICOM values have even length; DS pads with a space
    return RawDataElement(tag, "DS", len(text), text, 0, False, True)

"""DICOM-SEG out and back, with highdicom: a label map on a CT series' grid <-> one SEG instance.

One segment per structure present, labelled with the structure's name and coded from
`clinical/structures.json` (SNOMED CT category, type, laterality modifier; display colour), the
algorithm identified as the MONAI bundle. Encodings (`ENCODINGS`, named in `clinical.seg_encodings`):

- "labelmap-*": Label Map Segmentation Storage (DICOM 2024+, SOP class 1.2.840.10008.5.1.4.1.1.66.7):
  one 8-bit frame per slice whose pixel values are the bundle's labels, like the NIfTI output;
  "-rle", "-jpegls", "-jpeg2000" compress each frame losslessly.
- "binary", "binary-jpeg2000": the classic Segmentation Storage (1.2.840.10008.5.1.4.1.1.66.4):
  one 1-bit frame per slice and segment (non-empty frames only); uncompressed "binary" is the one
  encoding every reader tested opens (pydicom-seg and readers older than 2024 included).

Which reader opens which encoding is measured by tests/test_clinical_seg_readers.py, and size and
write/read times by `python -m perf.dicom_seg_benchmark` (docs/clinical-formats.md, DICOM-SEG).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
from highdicom.sr.coding import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import UID, generate_uid

from clinical import seg_encodings
from clinical import structures as st
from clinical.seg_encodings import DEFAULT_ENCODING
from wholebody.atomic import atomic_write

log = logging.getLogger(__name__)

ALGORITHM_NAME = "MONAI wholeBody_ct_segmentation"
BUNDLE_VERSION = "0.2.5"  # the bundle whose label order (structures.json) this product serves
MANUFACTURER = "wholebody-ct-triton"
# name -> (segmentation type, transfer syntax as pydicom's UID)
ENCODINGS: dict[str, tuple[str, UID]] = {
    name: (seg_type, UID(syntax)) for name, (seg_type, syntax) in seg_encodings.ENCODINGS.items()}


class DicomSegError(ValueError):
    """A DICOM-SEG that cannot be written or read back; the message is one line naming the file and the fix."""


@dataclass(frozen=True)
class SegmentInfo:
    """One segment read back: its number in the SEG, label (structure name), bundle label value and codes."""

    number: int
    name: str
    label: int
    category: st.Code
    type: st.Code
    modifier: st.Code | None


def series_and_instance_uids(uid_seed: str | None, kind: str = "") -> tuple[hd.UID, hd.UID]:
    """(Series Instance UID, SOP Instance UID) of a result: fresh ones for `uid_seed` None, else derived from
    the seed with pydicom's `generate_uid(entropy_srcs=...)`, so the same result made again (a redo after a
    crash) gets the same UIDs and a PACS stores it once. `kind` ("" for the SEG, "sr", "rtstruct") keeps the
    UIDs of a result's different objects apart."""
    if uid_seed is None:
        return hd.UID(), hd.UID()
    prefix = f"{kind}-" if kind else ""
    return (hd.UID(generate_uid(entropy_srcs=[uid_seed, f"{prefix}series"])),
            hd.UID(generate_uid(entropy_srcs=[uid_seed, f"{prefix}instance"])))


def coded_concept(code: st.Code) -> CodedConcept:
    """A `clinical.structures.Code` as highdicom's CodedConcept (a pydicom Dataset with CodeValue,
    CodingSchemeDesignator and CodeMeaning), for the SEG, the SR and the RTSTRUCT alike."""
    return CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def segment_descriptions(labels: list[int], numbers: list[int], version: str) -> list[hd.seg.SegmentDescription]:
    """highdicom segment descriptions of bundle `labels` (1..104), numbered `numbers` in the SEG."""
    algorithm = hd.AlgorithmIdentificationSequence(name=ALGORITHM_NAME, version=version,
                                                   family=codes.cid7162.ArtificialIntelligence)
    out = []
    for label, number in zip(labels, numbers):
        s = st.structures()[label]
        desc = hd.seg.SegmentDescription(
            segment_number=number, segment_label=s.name,
            segmented_property_category=coded_concept(s.category), segmented_property_type=coded_concept(s.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(*s.color))
        if s.modifier is not None:
            desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                coded_concept(s.modifier)]
        out.append(desc)
    return out


def write_dicom_seg(
    label_map: np.ndarray,
    source: list[Dataset],
    path: str | Path,
    *,
    encoding: str = DEFAULT_ENCODING,
    algorithm_version: str = BUNDLE_VERSION,
    series_description: str = "wholeBody_ct_segmentation",
    series_number: int = 300,
    uid_seed: str | None = None,
) -> Path:
    """Write `label_map` as a DICOM-SEG referencing the CT slices `source` (their headers, in Z order).

    label_map: [X, Y, Z] uint8, values 0..104 (bundle labels) on the source series' grid, as
    `clinical.dicom_series.read_ct_series` gives it (X = column, Y = row, Z = slice in `source` order).
    The file is written under a temporary name and renamed when complete. Returns `path`.
    uid_seed: None gives fresh Series and SOP Instance UIDs; a string derives both from it (pydicom's
    `generate_uid(entropy_srcs=...)`), so writing the SEG of one source again gives the same UIDs and a
    PACS stores it once (the router's retries after a crash rely on this).
    Raises DicomSegError for a label map of another shape, labels above 104, or source headers lacking
    the UIDs a SEG must reference (anonymised away); ValueError for an unknown encoding.
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown DICOM-SEG encoding {encoding!r}; choose one of {', '.join(ENCODINGS)}")
    path = Path(path)
    first = source[0]
    expected = (int(first.Columns), int(first.Rows), len(source))
    if label_map.shape != expected:
        raise DicomSegError(f"{path}: label map {label_map.shape} is not on the source series' grid {expected} "
                            "(columns, rows, slices); segment the series' own volume")
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
        if not all(ds.get(key) for ds in source):
            raise DicomSegError(f"{path}: the source series lacks {key} (anonymised away?), so a DICOM-SEG cannot "
                                "reference it; write NIfTI or seg.nrrd instead")
    present = [int(v) for v in np.unique(label_map) if v != 0]
    if present and present[-1] >= len(st.structures()):
        raise DicomSegError(f"{path}: label {present[-1]} is not a structure (0..{len(st.structures()) - 1})")
    seg_type, syntax = ENCODINGS[encoding]
    frames = np.ascontiguousarray(np.asarray(label_map, dtype=np.uint8).transpose(2, 1, 0))  # (slices, rows, cols)
    if seg_type == "LABELMAP":
        numbers = present  # pixel values stay the bundle's labels
    else:
        numbers = list(range(1, len(present) + 1))  # BINARY: segments 1..n
        lut = np.zeros(256, dtype=np.uint8)
        lut[present] = numbers
        frames = lut[frames]
    if not present:
        raise DicomSegError(f"{path}: the label map is empty (no structure found); a DICOM-SEG needs one segment")
    series_uid, sop_uid = series_and_instance_uids(uid_seed)
    seg = hd.seg.Segmentation(
        source_images=source, pixel_array=frames, segmentation_type=seg_type,
        segment_descriptions=segment_descriptions(present, numbers, algorithm_version),
        series_instance_uid=series_uid, series_number=series_number, sop_instance_uid=sop_uid, instance_number=1,
        manufacturer=MANUFACTURER, manufacturer_model_name=ALGORITHM_NAME, software_versions=algorithm_version,
        device_serial_number="0", transfer_syntax_uid=syntax, series_description=series_description,
        omit_empty_frames=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda stream: seg.save_as(stream, enforce_file_format=True))
    return path


def read_dicom_seg(path: str | Path, source: list[Dataset]) -> tuple[np.ndarray, list[SegmentInfo]]:
    """Read a DICOM-SEG back to a label map on the grid of the CT slices `source` (headers, Z order).

    Returns the label map [X, Y, Z] uint8 with the bundle's label values (segments matched to
    structures by their label, the structure name) and the segments' names and codes. Any encoding
    of this module, and SEGs of other tools whose segment labels are this bundle's structure names.
    Raises DicomSegError when the file is not a SEG of this series or a segment is not a structure.
    """
    path = Path(path)
    try:
        seg = hd.seg.segread(path)
    except Exception as exc:  # noqa: BLE001 - one line naming the file
        raise DicomSegError(f"{path}: not a readable DICOM-SEG ({str(exc).splitlines()[0]})") from exc
    info = []
    lut = np.zeros(65536, dtype=np.uint8)
    for number in seg.segment_numbers:
        desc = seg.get_segment_description(number)
        try:
            structure = st.by_name(desc.segment_label)
        except KeyError as exc:
            raise DicomSegError(f"{path}: segment {number} {desc.segment_label!r} is not a structure of this "
                                "bundle") from exc
        item = desc.SegmentedPropertyTypeCodeSequence[0]
        modifier = item.get("SegmentedPropertyTypeModifierCodeSequence")
        info.append(SegmentInfo(
            number, desc.segment_label, structure.label,
            st.Code(desc.segmented_property_category.value, desc.segmented_property_category.scheme_designator,
                    desc.segmented_property_category.meaning),
            st.Code(item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning),
            st.Code(modifier[0].CodeValue, modifier[0].CodingSchemeDesignator, modifier[0].CodeMeaning)
            if modifier else None))
        lut[number] = structure.label
    uids = [str(ds.SOPInstanceUID) for ds in source]
    try:
        frames = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=uids, combine_segments=True, relabel=False,
            assert_missing_frames_are_empty=True, skip_overlap_checks=True)
    except (ValueError, KeyError, AttributeError) as exc:
        raise DicomSegError(f"{path}: does not match the source series ({str(exc).splitlines()[0]}); give the "
                            "series it references") from exc
    label_map = lut[frames].transpose(2, 1, 0)  # (slices, rows, cols) -> [X, Y, Z]
    return np.ascontiguousarray(label_map), info

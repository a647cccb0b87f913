"""A DICOM Structured Report (TID 1500 Measurement Report, Comprehensive 3D SR) of one segmentation result.

    sr = make_measurement_report(seg, ct_datasets, label_map, ct, affine, quality_report)
    write_measurement_report(sr, "series3_seg_sr.dcm")
    rows = read_measurement_report("series3_seg_sr.dcm")   # {name: ReportedStructure}

Content (highdicom `MeasurementReport`), one TID 1411 Volumetric ROI group per structure present:

- Tracking Identifier: the structure's name, with a UID of its own;
- Referenced Segment: the SEG's segment of that structure (its SOP Instance, segment number, the CT
  series it was made from);
- Finding: the structure's SNOMED CT type code, Finding Category its category, Finding Site its type and
  laterality (clinical/structures.json), Algorithm Identification the bundle;
- Measurements (values from `clinical.statistics.structure_statistics`, the one source of these numbers):
  Volume (SCT 118565006) in UCUM "ml"; Attenuation Coefficient (DCM 112031) in UCUM "[hnsf'U]" with
  derivation Mean (SCT 373098007), Standard Deviation (SCT 386136009), Minimum (SCT 255605001) and
  Maximum (SCT 56851009);
- Qualitative Evaluations: the quality checks that applied to it (`clinical.quality`): concept = the
  check, in the private coding scheme `QC_SCHEME` (no standard code exists for them), value SCT Yes
  (373066001: the problem was found) or SCT No (373067005); for a left/right structure also the side seen
  from its centroid as Laterality (SCT 272741003) = Left (SCT 7771000) / Right (SCT 24028007).

One TID 1501 group with Tracking Identifier "scan quality" holds the per-scan checks and "held"
(the site's policy holds the result back). The private scheme is declared in the SR's Coding Scheme
Identification Sequence, as PS3.3 C.12.1.1.3.1 asks of a scheme not in PS3.16.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np
from highdicom.sr.coding import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from clinical import structures as st
from clinical.dicom_seg import ALGORITHM_NAME, BUNDLE_VERSION, MANUFACTURER, coded_concept, series_and_instance_uids
from clinical.quality import CHECKS, QualityReport
from clinical.statistics import StructureStatistics, structure_statistics
from wholebody.atomic import atomic_write

QC_SCHEME = "99WBQC"  # "99" opens a locally defined coding scheme (PS3.16 8.2)
QC_SCHEME_NAME = "wholebody-ct-triton quality checks"
# check name (clinical.quality.CHECKS, the code value) -> code meaning. A value of SCT Yes: the problem was found.
QC_MEANINGS: dict[str, str] = {
    "incomplete": "Structure cut by scan boundary",
    "components": "Structure fragmented",
    "laterality": "Laterality inconsistent with position",
    "volume": "Volume outside normal range",
    "neighbours": "Expected neighbour missing",
    "hu_range": "Intensities not plausible CT numbers",
    "padding": "Padding share excessive",
    "held": "Result held back by quality policy",
}
assert set(QC_MEANINGS) == {*CHECKS, "held"}
ML = Code("ml", "UCUM", "milliliter")
HU = codes.UCUM.HounsfieldUnit
STATISTICS = (("mean_hu", codes.SCT.Mean), ("std_hu", codes.SCT.StandardDeviation),
              ("min_hu", codes.SCT.Minimum), ("max_hu", codes.SCT.Maximum))
SCAN_GROUP = "scan quality"
SR_SERIES_DESCRIPTION = "wholeBody_ct_segmentation measurements"


class StructuredReportError(ValueError):
    """An SR that cannot be made or read; the message is one line naming the problem and the fix."""


def qc_code(check: str) -> CodedConcept:
    """The private concept of a quality check (a name of clinical.quality.CHECKS, or "held")."""
    return CodedConcept(check, QC_SCHEME, QC_MEANINGS[check])


def _yes_no(failed: bool) -> Code:
    return codes.SCT.Yes if failed else codes.SCT.No


def segment_numbers(seg: Dataset) -> dict[str, int]:
    """Structure name (SegmentLabel) -> segment number of a SEG (LABELMAP or BINARY)."""
    return {str(item.SegmentLabel): int(item.SegmentNumber) for item in seg.SegmentSequence}


def make_measurement_report(
    seg: Dataset,
    source: Sequence[Dataset],
    label_map: np.ndarray,
    ct: np.ndarray,
    affine: np.ndarray,
    quality: QualityReport | None = None,
    *,
    statistics: Sequence[StructureStatistics] | None = None,
    series_number: int = 301,
    algorithm_version: str = BUNDLE_VERSION,
    uid_seed: str | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 Measurement Report of a result (see the module docstring for its content).

    Args:
        seg: the DICOM-SEG written from `label_map` (clinical.dicom_seg), as read by pydicom.
        source: the CT series' headers (no pixels needed) that the SEG references, in Z order.
        label_map: [X, Y, Z] uint8 labels (bundle label values) on the CT's grid.
        ct: [X, Y, Z] CT in HU on that grid; affine: [4, 4] voxel -> RAS mm.
        quality: the result's `clinical.quality.check_scan` report; None: no qualitative evaluations.
        statistics: `structure_statistics` of these arrays, when already computed.
        uid_seed: None gives fresh Series and SOP Instance UIDs; a string derives both from it (as
            clinical.dicom_seg.write_dicom_seg does), so the SR of one result made again is stored once.

    Raises:
        StructuredReportError: the structures present in `label_map` are not the segments of `seg`, or
            `seg` does not reference `source`'s series.
    """
    names = st.label_names()
    rows = list(statistics) if statistics is not None else structure_statistics(label_map, ct, affine, names)
    numbers = segment_numbers(seg)
    missing = [r.name for r in rows if r.name not in numbers]
    extra = sorted((set(numbers) & set(names[1:])) - {r.name for r in rows})  # a LABELMAP SEG also has "Background"
    if missing or extra:  # e.g. a SEG left from an earlier run
        what = (f"no segment for {', '.join(missing[:5])}" if missing
                else f"segments {', '.join(extra[:5])} that the label map lacks")
        raise StructuredReportError(f"the SEG {seg.SOPInstanceUID} has {what}: make the SR from the SEG written "
                                    "from this label map")
    referenced = {str(item.SeriesInstanceUID) for item in seg.get("ReferencedSeriesSequence", [])}
    if seg.StudyInstanceUID != source[0].StudyInstanceUID or str(source[0].SeriesInstanceUID) not in referenced:
        raise StructuredReportError("the SEG does not reference this CT series; give the series it was made from")
    by_name = {s.name: s for s in (quality.structures if quality is not None else [])}
    algorithm = hd.sr.AlgorithmIdentification(name=ALGORITHM_NAME, version=algorithm_version)
    ct_series = hd.sr.SourceSeriesForSegmentation(str(source[0].SeriesInstanceUID))
    groups: list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
                 | hd.sr.MeasurementsAndQualitativeEvaluations] = []
    for row in rows:
        structure = st.structures()[row.label]
        measurements = [hd.sr.Measurement(name=codes.SCT.Volume, value=row.volume_ml, unit=ML, algorithm_id=algorithm)]
        measurements += [hd.sr.Measurement(name=codes.DCM.AttenuationCoefficient, value=getattr(row, key), unit=HU,
                                           derivation=derivation, algorithm_id=algorithm)
                         for key, derivation in STATISTICS]
        evaluations = []
        checked = by_name.get(row.name)
        for check in checked.checks if checked is not None else []:
            if check.status == "not_applicable":
                continue
            evaluations.append(hd.sr.QualitativeEvaluation(qc_code(check.check), _yes_no(check.status == "fail")))
            if check.check == "laterality":
                side = codes.SCT.Left if check.values["observed_side"] == "left" else codes.SCT.Right
                evaluations.append(hd.sr.QualitativeEvaluation(codes.SCT.Laterality, side))
        site = hd.sr.FindingSite(anatomic_location=coded_concept(structure.type),
                                 laterality=None if structure.modifier is None else coded_concept(structure.modifier))
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=row.name),
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=str(seg.SOPClassUID), sop_instance_uid=str(seg.SOPInstanceUID),
                segment_number=numbers[row.name], source_series=ct_series),
            finding_type=coded_concept(structure.type), finding_category=coded_concept(structure.category),
            finding_sites=[site], algorithm_id=algorithm, measurements=measurements,
            qualitative_evaluations=evaluations or None))
    if quality is not None:
        scan = [hd.sr.QualitativeEvaluation(qc_code(check), _yes_no(failed))
                for check, failed in _merged_scan_checks(quality).items()]
        scan.append(hd.sr.QualitativeEvaluation(qc_code("held"), _yes_no(quality.held)))
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=SCAN_GROUP),
            algorithm_id=algorithm, qualitative_evaluations=scan))
    observer = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name=ALGORITHM_NAME, manufacturer_name=MANUFACTURER, model_name=algorithm_version)))
    report = hd.sr.MeasurementReport(observation_context=observer,
                                     procedure_reported=codes.cid100.CTUnspecifiedBodyRegion,
                                     imaging_measurements=groups)
    series_uid, sop_uid = series_and_instance_uids(uid_seed, "sr")
    sr = hd.sr.Comprehensive3DSR(
        evidence=[seg], content=report[0], series_instance_uid=series_uid, series_number=series_number,
        sop_instance_uid=sop_uid, instance_number=1, manufacturer=MANUFACTURER, is_complete=True,
        series_description=SR_SERIES_DESCRIPTION)
    scheme = Dataset()
    scheme.CodingSchemeDesignator = QC_SCHEME
    scheme.CodingSchemeName = QC_SCHEME_NAME
    scheme.CodingSchemeResponsibleOrganization = MANUFACTURER
    sr.CodingSchemeIdentificationSequence = [scheme]
    return sr


def _merged_scan_checks(quality: QualityReport) -> dict[str, bool]:
    """Per-scan check name -> failed (the neighbours check runs once per series: failed if any failed);
    checks that did not apply are left out."""
    merged: dict[str, bool] = {}
    for c in quality.scan_checks:
        if c.status != "not_applicable":
            merged[c.check] = merged.get(c.check, False) or c.status == "fail"
    return merged


def write_measurement_report(sr: Dataset, path: str | os.PathLike[str]) -> Path:
    """Save `sr` as a DICOM file (with its File Meta Information), atomically. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda stream: sr.save_as(stream, enforce_file_format=True))
    return path


@dataclass(frozen=True)
class ReportedStructure:
    """One structure as read back from an SR: its segment reference, measurements and evaluations.

    measurements: {"volume_ml", "mean_hu", "std_hu", "min_hu", "max_hu"}; evaluations: {check: True when the
    problem was found}; laterality: "left" / "right" seen from the centroid, None if not lateral."""

    name: str
    segment_number: int
    seg_sop_instance_uid: str
    measurements: dict[str, float]
    evaluations: dict[str, bool] = field(default_factory=dict)
    laterality: str | None = None


def read_measurement_report(path: str | os.PathLike[str]) -> tuple[dict[str, ReportedStructure], dict[str, bool]]:
    """Read an SR of `make_measurement_report` back with highdicom (`hd.sr.srread`, MeasurementReport).

    Returns ({structure name: ReportedStructure}, {per-scan check or "held": problem found}).
    Raises StructuredReportError naming the file when it is not such a report.
    """
    try:
        sr = hd.sr.srread(path)
        report = hd.sr.MeasurementReport.from_sequence([sr])
    except Exception as exc:  # noqa: BLE001 - one line naming the file
        raise StructuredReportError(f"{path}: not a readable TID 1500 report ({str(exc).splitlines()[0]})") from exc
    derivations = {code.value: key for key, code in STATISTICS}
    out: dict[str, ReportedStructure] = {}
    for group in report.get_volumetric_roi_measurement_groups():
        values: dict[str, float] = {}
        for m in group.get_measurements():
            if m.name == codes.SCT.Volume:
                values["volume_ml"] = float(m.value)
            elif m.name == codes.DCM.AttenuationCoefficient and m.derivation is not None:
                values[derivations[m.derivation.value]] = float(m.value)
        evaluations, side = {}, None
        for e in group.get_qualitative_evaluations():
            if e.name.scheme_designator == QC_SCHEME:
                evaluations[e.name.value] = e.value == codes.SCT.Yes
            elif e.name == codes.SCT.Laterality:
                side = "left" if e.value == codes.SCT.Left else "right"
        segment = group.referenced_segment
        out[str(group.tracking_identifier)] = ReportedStructure(
            str(group.tracking_identifier), int(segment.referenced_segment_numbers[0])
            if hasattr(segment, "referenced_segment_numbers") else int(segment.segment_number),
            str(segment.referenced_sop_instance_uid), values, evaluations, side)
    scan: dict[str, bool] = {}
    for group in report.get_image_measurement_groups():
        if group.tracking_identifier == SCAN_GROUP:
            scan = {e.name.value: e.value == codes.SCT.Yes for e in group.get_qualitative_evaluations()}
    return out, scan
